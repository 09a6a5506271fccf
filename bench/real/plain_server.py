"""The alternative lmserve is measured against: a plain Python gRPC server, written the way a team
would hand-roll one, serving lmserve's own API (Embed and GenerateStream) so that one client
drives both.

One onnxruntime session per model with the host's cores as intra-op threads, shared by gRPC's
worker threads (onnxruntime runs concurrent calls on one session); no batching across requests,
no scheduling. Embed tokenizes, runs, mean-pools over the mask and normalizes, as
sentence-transformers does for all-MiniLM-L6-v2. GenerateStream decodes greedily with the KV
cache fed back from each step, one token per message.

    python plain_server.py --port 50060 --embed DIR --generate DIR
"""

import argparse
import json
import os
import sys
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import onnxruntime
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "gen"))
from lmserve.v1 import inference_pb2, inference_pb2_grpc  # noqa: E402


def session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Encoder:
    def __init__(self, folder: Path, threads: int):
        self.folder = folder
        self.session = session(folder / "model.onnx", threads)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # The file pads every text to 128 tokens, for a batch of one that is waste.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(256)
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed(self, texts: list[str]) -> list[tuple[np.ndarray, int]]:
        encodings = self.tokenizer.encode_batch(texts)
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), np.int64)
        mask = np.zeros((len(texts), width), np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        states = self.session.run(None, feed)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (states * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
        pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return [(pooled[row], len(e.ids)) for row, e in enumerate(encodings)]


class Decoder:
    def __init__(self, folder: Path, threads: int):
        self.session = session(folder / "model.onnx", threads)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.pasts = [i.name for i in self.session.get_inputs() if i.name.startswith("past_")]
        self.outputs = [o.name for o in self.session.get_outputs()]
        shape = next(i.shape for i in self.session.get_inputs() if i.name.startswith("past_"))
        self.empty = np.zeros((1, shape[1], 0, shape[3]), np.float32)

    def greedy(self, ids: list[int], max_new_tokens: int, ignore_eos: bool):
        past = {name: self.empty for name in self.pasts}
        fed, new = 0, ids
        for _ in range(max_new_tokens):
            feed = {"input_ids": np.array([new], np.int64),
                    "attention_mask": np.ones((1, fed + len(new)), np.int64),
                    "position_ids": np.arange(fed, fed + len(new), dtype=np.int64)[None], **past}
            result = dict(zip(self.outputs, self.session.run(None, feed)))
            token = int(result["logits"][0, -1].argmax())
            fed += len(new)
            past = {name: result[name.replace("past_key_values", "present")] for name in self.pasts}
            yield token
            new = [token]
            if token in self.eos and not ignore_eos:
                return


class Service(inference_pb2_grpc.InferenceServicer):
    def __init__(self, encoders: dict, decoders: dict):
        self.encoders = encoders
        self.decoders = decoders

    def Embed(self, request, context):
        encoder = self.encoders.get(request.model)
        if encoder is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model}")
        return inference_pb2.EmbedResponse(embeddings=[
            inference_pb2.Embedding(values=vector.tolist(), token_count=count)
            for vector, count in encoder.embed(list(request.texts))
        ])

    def GenerateStream(self, request, context):
        decoder = self.decoders.get(request.model)
        if decoder is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no model {request.model}")
        ids = list(request.token_ids.ids) or decoder.tokenizer.encode(request.text).ids
        parameters = request.parameters
        limit = parameters.max_new_tokens if parameters.HasField("max_new_tokens") else 64
        for token in decoder.greedy(ids, limit, parameters.ignore_eos):
            yield inference_pb2.GenerateStreamResponse(
                token=inference_pb2.GeneratedToken(id=token))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--embed", type=Path, action="append", default=[])
    parser.add_argument("--generate", type=Path, action="append", default=[])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    # Model names as lmserve's repository gives them: the folder above the version.
    encoders = {path.parent.name: Encoder(path, args.threads) for path in args.embed}
    decoders = {path.parent.name: Decoder(path, args.threads) for path in args.generate}
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    inference_pb2_grpc.add_InferenceServicer_to_server(Service(encoders, decoders), server)
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
