"""A Python gRPC client against the real `loraserve serve` binary.

Stubs are generated from proto/ with grpcio-tools into a temporary directory
at test time; the server runs on a free loopback port with the shared tiny
model and adapters, and must exit 0 on SIGTERM at the end.
Usage: python_client_test.py --binary BUILD/server/loraserve --shared ../shared --proto-dir proto
"""

import argparse
import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import unittest

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_tools import protoc

ARGS = None
SERVER = None  # the server process
CHANNEL = None
pb = {}  # generated modules: inference_pb2, inference_pb2_grpc, adapters_pb2, adapters_pb2_grpc


def generate_stubs(proto_dir, out_dir):
    protos = ["loraserve/v1/inference.proto", "loraserve/v1/adapters.proto"]
    code = protoc.main(["protoc", "-I", proto_dir, "--python_out", out_dir,
                        "--grpc_python_out", out_dir] + protos)
    if code != 0:
        raise RuntimeError(f"protoc failed ({code}) on {protos} in {proto_dir}")
    sys.path.insert(0, out_dir)
    from loraserve.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc
    pb.update(inference_pb2=inference_pb2, inference_pb2_grpc=inference_pb2_grpc,
              adapters_pb2=adapters_pb2, adapters_pb2_grpc=adapters_pb2_grpc)


def start_server():
    global SERVER, CHANNEL
    SERVER = subprocess.Popen(
        [ARGS.binary, "serve", f"--model={ARGS.shared}/models/aidreams-260k",
         f"--adapter-dir={ARGS.shared}/adapters/aidreams-260k", "--host=127.0.0.1",
         "--grpc-port=0", "--drain-seconds=10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    port = None
    log = []
    for line in SERVER.stderr:
        log.append(line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            port = int(match.group(1))
            break
    if port is None:
        raise RuntimeError("the server did not start:\n" + "".join(log))
    # Keep reading the log so the server never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in SERVER.stderr], daemon=True).start()
    CHANNEL = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(CHANNEL).result(timeout=30)


def greedy(text="", max_tokens=24, adapter=""):
    request = pb["inference_pb2"].GenerateRequest(text=text, max_tokens=max_tokens,
                                                  adapter=adapter, ignore_eos=True)
    request.sampling.temperature = 0.0
    return request


def generate(request):
    stub = pb["inference_pb2_grpc"].InferenceStub(CHANNEL)
    return list(stub.Generate(request, timeout=60))


class InferenceTest(unittest.TestCase):
    def test_generate_streams_tokens_with_and_without_adapters(self):
        responses = generate(greedy())
        self.assertEqual(len(responses), 24)
        self.assertTrue("".join(r.text for r in responses).startswith('"Echoes of vectors unfold'))
        self.assertEqual(responses[-1].finish_reason, "length")
        self.assertEqual(responses[-1].usage.prompt_tokens, 1)
        self.assertEqual(responses[-1].usage.completion_tokens, 24)
        self.assertTrue(all(r.finish_reason == "" for r in responses[:-1]))
        ocean = "".join(r.text for r in generate(greedy(adapter="ocean")))
        self.assertTrue(ocean.startswith("At low tide the rock pools shine"), ocean)

    def test_logprobs_and_token_id_prompt(self):
        request = greedy(max_tokens=8)
        request.token_ids.ids.append(1)  # BOS, what the empty text encodes to
        request.logprobs = 2
        by_ids = generate(request)
        self.assertEqual([r.token_id for r in by_ids],
                         [r.token_id for r in generate(greedy(max_tokens=8))])
        for response in by_ids:
            self.assertEqual(len(response.top_logprobs), 2)
            self.assertEqual(response.top_logprobs[0].token_id, response.token_id)

    def test_tokenize_and_detokenize(self):
        stub = pb["inference_pb2_grpc"].InferenceStub(CHANNEL)
        ids = stub.Tokenize(pb["inference_pb2"].TokenizeRequest(text="At low tide",
                                                                add_special_tokens=True)).token_ids
        self.assertEqual(ids[0], 1)
        text = stub.Detokenize(pb["inference_pb2"].DetokenizeRequest(
            token_ids=ids, skip_special_tokens=True)).text
        self.assertEqual(text, "At low tide")

    def test_errors_carry_their_codes(self):
        for request, code in [(greedy(max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT),
                              (greedy(max_tokens=1000), grpc.StatusCode.INVALID_ARGUMENT),
                              (greedy(adapter="bad id!"), grpc.StatusCode.INVALID_ARGUMENT),
                              (greedy(adapter="nope"), grpc.StatusCode.NOT_FOUND)]:
            with self.assertRaises(grpc.RpcError) as error:
                generate(request)
            self.assertEqual(error.exception.code(), code, error.exception.details())
            self.assertTrue(error.exception.details())
        self.assertEqual(len(generate(greedy(max_tokens=2))), 2)


class AdaptersTest(unittest.TestCase):
    def stub(self):
        return pb["adapters_pb2_grpc"].AdaptersStub(CHANNEL)

    def test_list_and_get(self):
        listed = self.stub().List(pb["adapters_pb2"].ListAdaptersRequest()).adapters
        self.assertIn("default/ocean", [a.id for a in listed])
        info = self.stub().Get(pb["adapters_pb2"].GetAdapterRequest(id="ocean"))
        self.assertEqual(info.id, "default/ocean")
        self.assertEqual(info.version, 1)
        self.assertEqual(len(info.content_hash), 64)
        self.assertEqual(list(info.ranks), [8])
        self.assertGreater(info.bytes, 0)
        self.assertTrue(info.resident_host)
        with self.assertRaises(grpc.RpcError) as error:
            self.stub().Get(pb["adapters_pb2"].GetAdapterRequest(id="missing"))
        self.assertEqual(error.exception.code(), grpc.StatusCode.NOT_FOUND)

    def test_upload_use_unload(self):
        adapter_dir = os.path.join(ARGS.shared, "adapters/aidreams-260k/ocean")
        with open(os.path.join(adapter_dir, "adapter_model.safetensors"), "rb") as f:
            tensors = f.read()
        with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
            config = f.read()
        messages = [pb["adapters_pb2"].UploadAdapterRequest(header=pb["adapters_pb2"].UploadHeader(
            id="py/ocean", adapter_config_json=config,
            sha256=hashlib.sha256(tensors).hexdigest(), total_bytes=len(tensors)))]
        chunk = 64 << 10
        for at in range(0, len(tensors), chunk):
            messages.append(pb["adapters_pb2"].UploadAdapterRequest(
                chunk=pb["adapters_pb2"].UploadChunk(data=tensors[at:at + chunk],
                                                     last=at + chunk >= len(tensors))))
        info = self.stub().Upload(iter(messages))
        self.assertEqual(info.id, "py/ocean")
        self.assertEqual([r.token_id for r in generate(greedy(max_tokens=12, adapter="py/ocean"))],
                         [r.token_id for r in generate(greedy(max_tokens=12, adapter="ocean"))])
        self.stub().Unload(pb["adapters_pb2"].UnloadAdapterRequest(id="py/ocean"))
        with self.assertRaises(grpc.RpcError) as error:
            generate(greedy(adapter="py/ocean"))
        self.assertEqual(error.exception.code(), grpc.StatusCode.NOT_FOUND)


class ServerTest(unittest.TestCase):
    def test_health_reports_serving(self):
        response = health_pb2_grpc.HealthStub(CHANNEL).Check(health_pb2.HealthCheckRequest())
        self.assertEqual(response.status, health_pb2.HealthCheckResponse.SERVING)

    def test_reflection_lists_and_describes_the_services(self):
        stub = reflection_pb2_grpc.ServerReflectionStub(CHANNEL)
        responses = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = [s.name for s in responses[0].list_services_response.service]
        for service in ["loraserve.v1.Inference", "loraserve.v1.Adapters", "grpc.health.v1.Health"]:
            self.assertIn(service, names)
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(CHANNEL))
        methods = [m.name for m in pool.FindServiceByName("loraserve.v1.Inference").methods]
        self.assertEqual(methods[:3], ["Generate", "Tokenize", "Detokenize"])


def main():
    global ARGS
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--shared", required=True)
    parser.add_argument("--proto-dir", required=True)
    ARGS, rest = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as out_dir:
        generate_stubs(ARGS.proto_dir, out_dir)
        start_server()
        try:
            result = unittest.main(argv=[sys.argv[0]] + rest, exit=False).result
        finally:
            CHANNEL.close()
            SERVER.send_signal(signal.SIGTERM)
            code = SERVER.wait(timeout=60)
    if code != 0:
        print(f"the server exited with {code} after SIGTERM, expected 0", file=sys.stderr)
        return 1
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
