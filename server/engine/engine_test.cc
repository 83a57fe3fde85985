// engine tests: being written
