"""`crossvit serve` against the real tritonclient HTTP and gRPC clients (sync and asyncio),
on loopback, every request bounded in time."""

import asyncio
import gzip
import http.client
import itertools
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import tritonclient.grpc as grpcclient  # the serve and dev extras: make test installs both
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from crossvit.runtime.serving.server import ServeOptions, Server


class Running:
    """A server on its own event loop in a thread, on free loopback ports."""

    def __init__(self, artifact, **options):
        self.server = Server(artifact, ServeOptions(http_port=0, grpc_port=0, **options))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start())
        self.http = f"127.0.0.1:{self.server.http_port}"
        self.grpc = f"127.0.0.1:{self.server.grpc_port}"

    def call(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.call(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def raw(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.http_port, timeout=30)
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, data


@pytest.fixture(scope="module")
def onnx_path(digits_onnx):
    return digits_onnx


@pytest.fixture(scope="module")
def server(onnx_path):
    s = Running(onnx_path, max_batch=16, max_delay_ms=5)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def reference(onnx_path):
    from crossvit.runtime.session import open_session

    with open_session(onnx_path) as s:
        yield s


@pytest.fixture(scope="module")
def pngs():
    from crossvit.assets import heldout_images
    from crossvit.runtime.images import list_images

    images = list_images(heldout_images())
    return [p.read_bytes() for p in images.files[:6]], images.labels[:6]


def _x(n, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, 32, 32), dtype=np.float32)


def _input(x):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def _http_infer(client, x, *, binary=True, class_count=0, **kwargs):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("logits", binary_data=binary, class_count=class_count)
    return client.infer("crossvit_digits", [inp], outputs=[out], **kwargs)


def _grpc_infer(client, x, class_count=0):
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("crossvit_digits", [inp], outputs=[grpcclient.InferRequestedOutput("logits", class_count=class_count)])


# -- metadata and health -------------------------------------------------------------------------

def test_health_and_metadata_over_http_and_grpc(server):
    h = httpclient.InferenceServerClient(server.http)
    assert h.is_server_live() and h.is_server_ready() and h.is_model_ready("crossvit_digits")
    meta = h.get_model_metadata("crossvit_digits")
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert "classification" in h.get_server_metadata()["extensions"]
    assert h.get_model_config("crossvit_digits")["max_batch_size"] == 16
    g = grpcclient.InferenceServerClient(server.grpc)
    assert g.is_server_live() and g.is_server_ready() and g.is_model_ready("crossvit_digits", "1")
    gm = g.get_model_metadata("crossvit_digits", as_json=True)
    assert gm["inputs"][0]["shape"] == ["-1", "3", "32", "32"] and gm["versions"] == ["1"]
    assert g.get_server_metadata(as_json=True)["name"] == "crossvit"
    assert g.get_model_config("crossvit_digits", as_json=True)["config"]["max_batch_size"] == 16


def test_metadata_and_config_declare_both_inputs_over_http_and_grpc(server):
    """The BYTES input used to be accepted under any name and listed nowhere: a client reading the
    metadata (tritonclient users, Triton-based gateways) never learned it existed."""
    from tritonclient.grpc import model_config_pb2

    h = httpclient.InferenceServerClient(server.http)
    assert h.get_model_metadata("crossvit_digits")["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        {"name": "images", "datatype": "BYTES", "shape": [-1, 1]}]
    assert h.get_model_config("crossvit_digits")["input"] == [
        {"name": "input", "data_type": "TYPE_FP32", "dims": [3, 32, 32], "optional": True},
        {"name": "images", "data_type": "TYPE_STRING", "dims": [1], "optional": True}]
    g = grpcclient.InferenceServerClient(server.grpc)
    meta = g.get_model_metadata("crossvit_digits")  # the protobuf messages, as Triton's own clients read them
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("input", "FP32", [-1, 3, 32, 32]),
                                                                          ("images", "BYTES", [-1, 1])]
    config = g.get_model_config("crossvit_digits").config
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("input", model_config_pb2.TYPE_FP32, [3, 32, 32], True),
        ("images", model_config_pb2.TYPE_STRING, [1], True)]


# -- inference -----------------------------------------------------------------------------------

@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("compression", [None, "gzip", "deflate"])
def test_http_inference_matches_the_session(server, reference, binary, compression):
    x = _x(3, seed=1)
    client = httpclient.InferenceServerClient(server.http)
    r = _http_infer(client, x, binary=binary, request_compression_algorithm=compression)
    np.testing.assert_allclose(r.as_numpy("logits"), reference.infer(x), rtol=1e-5, atol=1e-5)


def test_grpc_inference_matches_the_session(server, reference):
    x = _x(5, seed=2)
    r = _grpc_infer(grpcclient.InferenceServerClient(server.grpc), x)
    np.testing.assert_allclose(r.as_numpy("logits"), reference.infer(x), rtol=1e-5, atol=1e-5)


def test_requests_larger_than_max_batch_are_split_not_refused(server, reference):
    x = _x(40, seed=3)  # max_batch is 16
    r = _http_infer(httpclient.InferenceServerClient(server.http), x)
    np.testing.assert_allclose(r.as_numpy("logits"), reference.infer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("rows", ["[N, 1]", "[N]"])  # the declared shape, and the flat one clients sent before
def test_image_files_as_bytes_are_decoded_and_classified(server, reference, pngs, protocol, rows):
    files, labels = pngs
    data = np.array(files, dtype=np.object_)
    if rows == "[N, 1]":
        data = data.reshape(-1, 1)
    expected = reference.predict(files, top_k=1)
    if protocol == "http":
        inp = httpclient.InferInput("images", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        r = httpclient.InferenceServerClient(server.http).infer(
            "crossvit_digits", [inp], outputs=[httpclient.InferRequestedOutput("logits", class_count=2)])
    else:
        inp = grpcclient.InferInput("images", list(data.shape), "BYTES")
        inp.set_data_from_numpy(data)
        r = grpcclient.InferenceServerClient(server.grpc).infer(
            "crossvit_digits", [inp], outputs=[grpcclient.InferRequestedOutput("logits", class_count=2)])
    top = r.as_numpy("logits")
    assert top.shape == (len(files), 2)
    for row, p, label in zip(top, expected, labels):
        score, index, name = row[0].decode().split(":")
        assert int(index) == p.indices[0] and name == p.labels[0] == label
        assert len(score.split(".")[1]) == 6  # std::to_string's six decimals, as Triton prints


def _bytes_or_fp32(client_module, name, datatype, pngs):
    if datatype == "BYTES":
        data = np.array(pngs[0][:2], dtype=np.object_).reshape(-1, 1)
    else:
        data = _x(2)
    inp = client_module.InferInput(name, list(data.shape), datatype)
    inp.set_data_from_numpy(data)
    return inp


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("name, datatype, words", [
    ("x", "BYTES", "unknown input 'x'"),  # BYTES used to be taken under any name
    ("INPUT", "BYTES", "unknown input 'INPUT'"),
    ("pixels", "FP32", "unknown input 'pixels'"),
    ("input", "BYTES", "input 'input' must be FP32, got 'BYTES'; send encoded images as 'images'"),
    ("images", "FP32", "input 'images' must be BYTES (encoded image files), got 'FP32'"),
])
def test_inputs_are_taken_only_under_their_declared_names(server, pngs, protocol, name, datatype, words):
    client_module = httpclient if protocol == "http" else grpcclient
    client = client_module.InferenceServerClient(server.http if protocol == "http" else server.grpc)
    with pytest.raises(InferenceServerException) as e:
        client.infer("crossvit_digits", [_bytes_or_fp32(client_module, name, datatype, pngs)])
    assert e.value.status() == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"), e.value
    message = e.value.message()
    assert words in message and len(message.splitlines()) == 1 and len(message) < 300, message
    if words.startswith("unknown input"):  # the refusal names what the model does take
        assert "'input' (FP32 [N, 3, 32, 32]) or 'images' (BYTES [N, 1] of encoded image files)" in message
    assert client.is_server_ready()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_request_sends_exactly_one_of_the_two_inputs(server, pngs, protocol):
    client_module = httpclient if protocol == "http" else grpcclient
    client = client_module.InferenceServerClient(server.http if protocol == "http" else server.grpc)
    both = [_bytes_or_fp32(client_module, "input", "FP32", pngs), _bytes_or_fp32(client_module, "images", "BYTES",
                                                                                 pngs)]
    with pytest.raises(InferenceServerException) as e:
        client.infer("crossvit_digits", both)
    assert e.value.status() == ("400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"), e.value
    assert "a request sends exactly one input, 'input' (FP32" in e.value.message() and "got 2" in e.value.message()


def test_serve_refuses_an_artifact_whose_input_is_named_images(onnx_path, tmp_path, cli, one_line_error):
    """Its FP32 input and the BYTES input would share one name: a request could not say which it sends."""
    import onnx

    from crossvit.contract import read_onnx_metadata, write_onnx_metadata
    from crossvit.errors import ArtifactError

    meta, _ = read_onnx_metadata(onnx_path)
    proto = onnx.load(str(onnx_path))
    old = meta["inputs"][0]["name"]
    for node in proto.graph.node:
        node.input[:] = ["images" if i == old else i for i in node.input]
    proto.graph.input[0].name = meta["inputs"][0]["name"] = "images"
    write_onnx_metadata(proto, meta)
    renamed = tmp_path / "renamed.onnx"
    onnx.save(proto, str(renamed))
    with pytest.raises(ArtifactError, match="its input is named 'images'"):
        Server(renamed, ServeOptions(http_port=0, grpc_port=0))
    one_line_error(cli("serve", renamed, "--http-port", "0", "--grpc-port", "0", timeout=60),
                   "renamed.onnx: its input is named 'images', the name serve gives its BYTES input")


def test_json_numbers_of_exactly_zero_and_one_are_numbers(server, reference):
    """Values are scanned for hidden booleans only where one is exactly 0 or 1: such data, flat,
    nested or as integers, is still answered as the numbers it is."""
    x = np.round(_x(2, seed=4)).clip(0, 1).astype(np.float32)  # nothing but 0.0 and 1.0
    for data in (x.ravel().tolist(), x.tolist(), [int(v) for v in x.ravel()]):
        status, out = server.raw("POST", INFER, _json(x.shape, data=data))
        assert status == 200, out[:300]
        logits = np.asarray(json.loads(out)["outputs"][0]["data"], dtype=np.float32).reshape(2, 10)
        np.testing.assert_allclose(logits, reference.infer(x), rtol=1e-5, atol=1e-5)


def test_json_classification_strings_are_triton_format(server, reference):
    x = _x(2, seed=4)
    r = _http_infer(httpclient.InferenceServerClient(server.http), x, binary=False, class_count=3)
    logits = reference.infer(x)
    first = r.as_numpy("logits")[0][0]
    first = first.decode() if isinstance(first, bytes) else first
    i = int(np.argmax(logits[0]))
    assert first == f"{logits[0, i]:f}:{i}:{i}"


def test_concurrent_clients_each_get_their_own_rows_and_are_batched(server, reference):
    xs = [_x(1 + i % 3, seed=100 + i) for i in range(32)]
    results = [None] * 32

    def call(i):
        client = httpclient.InferenceServerClient(server.http)
        results[i] = _http_infer(client, xs[i]).as_numpy("logits")

    before = server.server.service.stats.triton()["model_stats"][0]["execution_count"]
    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for x, out in zip(xs, results):
        np.testing.assert_allclose(out, reference.infer(x), rtol=1e-5, atol=1e-5)
    stats = httpclient.InferenceServerClient(server.http).get_inference_statistics("crossvit_digits")
    executions = stats["model_stats"][0]["execution_count"] - before
    assert executions < 32  # some requests shared a session call
    assert any(b["batch_size"] > 3 for b in stats["model_stats"][0]["batch_stats"])


def test_asyncio_clients(server, reference):
    import tritonclient.grpc.aio as agrpc
    import tritonclient.http.aio as ahttp

    x = _x(2, seed=5)

    async def main():
        h = ahttp.InferenceServerClient(server.http)
        g = agrpc.InferenceServerClient(server.grpc)
        try:
            hi = ahttp.InferInput("input", [2, 3, 32, 32], "FP32")
            hi.set_data_from_numpy(x)
            gi = agrpc.InferInput("input", [2, 3, 32, 32], "FP32")
            gi.set_data_from_numpy(x)
            rh, rg = await asyncio.gather(h.infer("crossvit_digits", [hi]), g.infer("crossvit_digits", [gi]))
            return rh.as_numpy("logits"), rg.as_numpy("logits")
        finally:
            await h.close()
            await g.close()

    for out in asyncio.run(main()):
        np.testing.assert_allclose(out, reference.infer(x), rtol=1e-5, atol=1e-5)


def test_statistics_and_metrics_agree(server):
    _http_infer(httpclient.InferenceServerClient(server.http), _x(2))
    stats = grpcclient.InferenceServerClient(server.grpc).get_inference_statistics("crossvit_digits", as_json=True)
    s = stats["model_stats"][0]
    assert int(s["inference_count"]) >= 2 and int(s["inference_stats"]["success"]["count"]) >= 1
    status, text = server.raw("GET", "/metrics")
    text = text.decode()
    assert status == 200 and "crossvit_batch_size_bucket" in text and "crossvit_queue_seconds" in text
    assert 'crossvit_requests_total{outcome="success",protocol="http"}' in text


# -- bad requests get Triton's statuses, and the server stays healthy ----------------------------

def _json(x_shape=(1, 3, 32, 32), name="input", datatype="FP32", data=None):
    n = int(np.prod(x_shape))
    return json.dumps({"inputs": [{"name": name, "shape": list(x_shape), "datatype": datatype,
                                   "data": data if data is not None else [0.0] * n}]}).encode()


INFER = "/v2/models/crossvit_digits/infer"


@pytest.mark.parametrize("method, path, body, headers, status, words", [
    ("POST", INFER, b"{not json", {}, 400, "malformed JSON"),
    ("POST", INFER, b'{"inputs": []}', {}, 400, "non-empty 'inputs'"),
    ("POST", INFER, b'{"inputs": [{"name": "input"}]}', {}, 400, "needs 'name', 'datatype' and 'shape'"),
    ("POST", INFER, _json((1, 3, 16, 16)), {}, 400, "must have shape [N, 3, 32, 32]"),
    ("POST", INFER, _json(datatype="INT32"), {}, 400, "must be FP32"),
    ("POST", INFER, _json(name="pixels"), {}, 400, "unknown input 'pixels'"),
    ("POST", INFER, _json(data=[0.0] * 10), {}, 400, "10 values for shape"),
    ("POST", INFER, _json(data=["a"] * 3072), {}, 400, "must be numbers"),
    ("POST", INFER, json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                            "parameters": {"binary_data_size": 12288}}]}).encode() + b"\0" * 100,
     {"Inference-Header-Content-Length": None}, 400, "binary data truncated"),
    ("POST", INFER, json.dumps({"inputs": [{"name": "images", "shape": [2], "datatype": "BYTES",
                                            "data": ["not an image", "neither"]}]}).encode(), {}, 400,
     "element 0 is not a usable image"),
    ("POST", INFER, b"\x1f\x8b garbage", {"Content-Encoding": "gzip"}, 400, "not valid gzip"),
    ("POST", "/v2/models/resnet50/infer", _json(), {}, 404, "unknown model 'resnet50'"),
    ("POST", "/v2/models/crossvit_digits/versions/7/infer", _json(), {}, 404, "unknown version '7'"),
    ("GET", INFER, None, {}, 405, "not allowed"),
    ("GET", "/v2/nowhere", None, {}, 404, "no route"),
])
def test_bad_http_requests_get_their_status(server, method, path, body, headers, status, words):
    if "Inference-Header-Content-Length" in headers:
        headers = {"Inference-Header-Content-Length": str(len(body) - 100)}
    got, data = server.raw(method, path, body, headers)
    assert got == status, data
    assert words in json.loads(data)["error"]
    assert _http_infer(httpclient.InferenceServerClient(server.http), _x(1)).as_numpy("logits").shape == (1, 10)


def test_a_nan_input_is_a_bad_request(server):
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                   "data": [0.0] * 3071 + [1e39]}]}).encode()  # overflows float32 to inf
    status, data = server.raw("POST", INFER, body)
    assert status == 400 and "NaN or infinite" in json.loads(data)["error"]


@pytest.mark.parametrize("call, code", [
    (lambda c: c.infer("resnet50", [grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")]), "NOT_FOUND"),
    (lambda c: _grpc_infer(c, np.zeros((1, 3, 8, 8), np.float32)), "INVALID_ARGUMENT"),
    (lambda c: c.get_model_metadata("resnet50"), "NOT_FOUND"),
])
def test_bad_grpc_requests_get_their_status_code(server, call, code):
    client = grpcclient.InferenceServerClient(server.grpc)
    with pytest.raises(InferenceServerException) as e:
        call(client)
    assert code in str(e.value.status())
    assert client.is_server_ready()


def test_oversized_bodies_are_refused_with_413(onnx_path):
    s = Running(onnx_path, max_body=100_000)
    try:
        status, data = s.raw("POST", INFER, _json((16, 3, 32, 32)))  # ~ 200 kB of JSON
        assert status == 413 and "limit" in json.loads(data)["error"]
        bomb = gzip.compress(b" " * 5_000_000)
        status, _ = s.raw("POST", INFER, bomb, {"Content-Encoding": "gzip"})
        assert status == 413
    finally:
        s.stop()


def _binary(doc, blob=b""):
    header = json.dumps(doc).encode()
    return header + blob, {"Inference-Header-Content-Length": str(len(header))}


_ZEROS = [0.0] * 3072
_HUGE_SHAPES = [[2 ** 62, 3, 32, 32], [2 ** 54 + 1, 3, 32, 32]]  # element counts that wrap around int64


@pytest.mark.parametrize("body, headers, words", [
    (b'{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ' + b"[" * 100_000
     + b"]" * 100_000 + b"}]}", {}, "nested too deeply"),
    (b"[" * 100_000 + b"]" * 100_000, {}, "nested too deeply"),
    (b'{"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [1' + b"0" * 400
     + b"0," * 3071 + b"0]}]}", {}, "beyond FP32's range"),
    (_json(_HUGE_SHAPES[0], data=[]), {}, "limit of"),
    (json.dumps({"inputs": [{"name": "input", "shape": _HUGE_SHAPES[1], "datatype": "FP32",
                             "data": _ZEROS}]}).encode(), {}, "limit of"),
    *[(*_binary({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32",
                             "parameters": {"binary_data_size": len(blob)}}]}, blob), "limit of")
      for shape, blob in [(_HUGE_SHAPES[0], b""), (_HUGE_SHAPES[1], b"\0" * 12288)]],
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": _ZEROS}],
                 "outputs": [{"name": "logits", "parameters": [1]}]}).encode(), {}, "'parameters' must be"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": _ZEROS}],
                 "outputs": [{"name": "logits", "parameters": "x"}]}).encode(), {}, "'parameters' must be"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": _ZEROS}],
                 "outputs": 5}).encode(), {}, "'outputs' must be a list"),
    (json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": _ZEROS}],
                 "outputs": [{"name": "logits", "parameters": {"binary_data": "no"}}]}).encode(), {},
     "binary_data must be true or false"),
    (json.dumps({"id": {"a": [1]}, "inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                                                "data": _ZEROS}]}).encode(), {}, "'id' must be a string"),
    *[(json.dumps({"inputs": [{"name": "input", "shape": [1, 3, 32, 32], "datatype": "FP32",
                               "data": data}]}).encode(), {}, "must be numbers, not strings")
      for data in (["1.5"] + _ZEROS[1:], [True] * 3072,  # numpy would take all of these as numbers
                   [0.5] + _ZEROS[1:-1] + [True], [[[[0.25] * 32] * 32] * 2 + [[[0.0] * 31 + [False]] * 32]])],
    (json.dumps({"inputs": [{"name": "images", "shape": [2, 1], "datatype": "BYTES",
                             "data": [["a"], 5]}]}).encode(), {}, "JSON data must be strings"),
    (json.dumps({"inputs": [{"name": "images", "shape": [2, 1], "datatype": "BYTES",  # "bc": not read as "b", "c"
                             "data": [["a"], "bc"]}]}).encode(), {}, "element 0 is not a usable image"),
])
def test_malformed_http_requests_are_400_not_500(server, body, headers, words):
    got, data = server.raw("POST", INFER, body, headers)
    assert got == 400, data[:300]
    error = json.loads(data)["error"]
    assert words in error and len(error) < 300, error
    assert _http_infer(httpclient.InferenceServerClient(server.http), _x(1)).as_numpy("logits").shape == (1, 10)


def test_element_counts_do_not_wrap_around_without_a_row_limit(onnx_path):
    """to_batch counts elements in Python ints: np.prod wraps 2**62 x 3072 to 0, which let an
    empty binary tensor pass the size check and fail in reshape (a 500)."""
    from crossvit.runtime.serving.protocol import InferRequest, InputTensor, ModelView, ProtocolError, to_batch

    view = ModelView("m", "1", "input", (3, 32, 32), "logits", tuple("0123456789"), "p")
    for tensor in [InputTensor("input", "FP32", _HUGE_SHAPES[0], raw=b""),
                   InputTensor("input", "FP32", _HUGE_SHAPES[1], raw=b"\0" * 12288),
                   InputTensor("input", "FP32", _HUGE_SHAPES[1], data=_ZEROS)]:
        with pytest.raises(ProtocolError) as e:
            to_batch(InferRequest(None, [tensor]), view, None)
        assert e.value.status == 400 and "for shape" in e.value.message


@pytest.mark.parametrize("shape, raw, fp32", [
    (_HUGE_SHAPES[0], b"", None), (_HUGE_SHAPES[1], b"\0" * 12288, None), (_HUGE_SHAPES[1], None, _ZEROS),
])
def test_malformed_grpc_shapes_are_invalid_argument(server, shape, raw, fp32):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request = service_pb2.ModelInferRequest(model_name="crossvit_digits")
    t = request.inputs.add(name="input", datatype="FP32", shape=shape)
    if raw is not None:
        request.raw_input_contents.append(raw)
    else:
        t.contents.fp32_contents.extend(fp32)
    with grpc.insecure_channel(server.grpc) as channel:
        with pytest.raises(grpc.RpcError) as e:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit of" in e.value.details()
    assert grpcclient.InferenceServerClient(server.grpc).is_server_ready()


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata", "ServerLive"])
def test_grpc_garbage_bytes_are_invalid_argument_in_plain_words(server, method):
    """Bytes that are not a protobuf message used to be UNKNOWN naming a Python class (DecodeError)."""
    import grpc

    with grpc.insecure_channel(server.grpc) as channel:
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")  # no serializers: raw bytes
        with pytest.raises(grpc.RpcError) as e:
            call(b"\xff\xff\xff\xff garbage, not a protobuf message", timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    assert "not a valid" in e.value.details() and "Error" not in e.value.details(), e.value.details()
    assert grpcclient.InferenceServerClient(server.grpc).is_server_ready()


def test_grpc_classification_must_be_an_integer_parameter(server):
    """A string "3" used to read as 0 ("must be >= 1, got 0"); an int64 3 is the top 3."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    def ask(set_param):
        request = service_pb2.ModelInferRequest(model_name="crossvit_digits")
        request.inputs.add(name="input", datatype="FP32", shape=[1, 3, 32, 32])
        request.raw_input_contents.append(np.zeros((1, 3, 32, 32), np.float32).tobytes())
        set_param(request.outputs.add(name="logits").parameters["classification"])
        with grpc.insecure_channel(server.grpc) as channel:
            return service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)

    with pytest.raises(grpc.RpcError) as e:
        ask(lambda p: setattr(p, "string_param", "3"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must be an integer" in e.value.details()
    reply = ask(lambda p: setattr(p, "int64_param", 3))
    assert reply.outputs[0].datatype == "BYTES" and list(reply.outputs[0].shape) == [1, 3]


def test_unforeseen_errors_reading_a_request_are_400_and_after_it_500(server, monkeypatch):
    """The last line of defence: whatever escapes the checks while a request is read is the
    request's fault (400 / INVALID_ARGUMENT); a fault after that is a 500 / INTERNAL in the
    usual JSON, never Starlette's bare 500 or gRPC's UNKNOWN."""
    from crossvit.runtime.serving import grpc_service, rest

    def boom(*args):
        raise KeyError("surprise")

    monkeypatch.setattr(rest, "parse_http_request", boom)
    monkeypatch.setattr(grpc_service, "_request", boom)
    status, data = server.raw("POST", INFER, _json())
    assert status == 400 and "malformed request (KeyError: 'surprise')" in json.loads(data)["error"]
    with pytest.raises(InferenceServerException) as e:
        _grpc_infer(grpcclient.InferenceServerClient(server.grpc), _x(1))
    assert "INVALID_ARGUMENT" in str(e.value.status()) and "KeyError" in e.value.message()
    monkeypatch.undo()

    class Broken:  # a preprocessor that fails in a way nobody foresaw
        input_size = (3, 32, 32)

        def __call__(self, data):
            raise RuntimeError("odd image")

    monkeypatch.setattr(server.server.session, "_preprocessor", Broken())
    status, data = server.raw("POST", INFER, json.dumps({"inputs": [{"name": "images", "shape": [1],
                                                                     "datatype": "BYTES", "data": ["img"]}]}).encode())
    assert status == 400 and "RuntimeError: odd image" in json.loads(data)["error"]
    monkeypatch.undo()

    async def broken_batcher(x):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(server.server.service.batcher, "infer", broken_batcher)
    status, data = server.raw("POST", INFER, _json())
    assert status == 500 and "ZeroDivisionError" in json.loads(data)["error"]
    with pytest.raises(InferenceServerException) as e:
        _grpc_infer(grpcclient.InferenceServerClient(server.grpc), _x(1))
    assert "INTERNAL" in str(e.value.status())
    monkeypatch.undo()
    assert _http_infer(httpclient.InferenceServerClient(server.http), _x(1)).as_numpy("logits").shape == (1, 10)


@pytest.fixture(scope="module")
def small_queue(onnx_path):
    """max_batch 4 x max_queue 2: a request may hold at most 8 rows."""
    s = Running(onnx_path, max_batch=4, max_delay_ms=0, max_queue=2)
    yield s
    s.stop()


def test_a_request_over_the_row_limit_is_400_not_a_503_to_retry(small_queue, reference):
    http, grpc_ = httpclient.InferenceServerClient(small_queue.http), grpcclient.InferenceServerClient(small_queue.grpc)
    x = _x(8, seed=6)  # two pieces of 4: fills the idle queue exactly
    np.testing.assert_allclose(_http_infer(http, x).as_numpy("logits"), reference.infer(x), rtol=1e-5, atol=1e-5)
    for binary in (True, False):
        with pytest.raises(InferenceServerException) as e:
            _http_infer(http, _x(9), binary=binary)
        assert e.value.status() == "400" and "limit of 8 per request" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        _grpc_infer(grpc_, _x(9))
    assert "INVALID_ARGUMENT" in str(e.value.status()) and "limit of 8 per request" in e.value.message()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("n", [9, 30_000])
def test_bytes_requests_over_the_row_limit_are_refused_before_decoding(small_queue, monkeypatch, protocol, n):
    """30000 tiny images in a 480 kB body would be a 3 x 32 x 32 float32 batch each (360 MB)
    before decoding: refused from the shape, nothing allocated or decoded."""
    session = small_queue.server.session
    real, calls = session.preprocessor, []

    class Counting:
        input_size = real.input_size

        def __call__(self, data):
            calls.append(1)
            return real(data)

    monkeypatch.setattr(session, "_preprocessor", Counting())
    data = np.array([b"P5 1 1 255\n\x00"] * n, dtype=np.object_)
    client = httpclient if protocol == "http" else grpcclient
    inp = client.InferInput("images", [n], "BYTES")
    inp.set_data_from_numpy(data)
    server = client.InferenceServerClient(small_queue.http if protocol == "http" else small_queue.grpc)
    with pytest.raises(InferenceServerException) as e:
        server.infer("crossvit_digits", [inp])
    assert "limit of 8 per request" in e.value.message() and not calls
    ok = client.InferInput("images", [8], "BYTES")
    ok.set_data_from_numpy(data[:8])
    assert server.infer("crossvit_digits", [ok]).as_numpy("logits").shape == (8, 10) and len(calls) == 8


def test_bytes_requests_that_would_decode_past_the_memory_limit_are_413_before_decoding(small_queue, monkeypatch):
    """Under the row limit but over the decoded-size limit (here lowered to 5 images of the
    digits model's 3 x 32 x 32 float32): refused whole before anything is decoded; 5 still work."""
    from crossvit.runtime.serving import protocol

    monkeypatch.setattr(protocol, "MAX_DECODED_BYTES", 5 * 3 * 32 * 32 * 4)
    data = np.array([b"P5 1 1 255\n\x00"] * 6, dtype=np.object_)
    for client, address in ((httpclient, small_queue.http), (grpcclient, small_queue.grpc)):
        server = client.InferenceServerClient(address)
        inp = client.InferInput("images", [6], "BYTES")
        inp.set_data_from_numpy(data)
        with pytest.raises(InferenceServerException) as e:
            server.infer("crossvit_digits", [inp])
        assert "over the 0 MiB per request" in e.value.message()
        assert e.value.status() in ("413", "StatusCode.RESOURCE_EXHAUSTED")
        ok = client.InferInput("images", [5], "BYTES")
        ok.set_data_from_numpy(data[:5])
        assert server.infer("crossvit_digits", [ok]).as_numpy("logits").shape == (5, 10)


# -- a slow or failing backend ------------------------------------------------------------------

class _Slow:
    """Wraps a session: each call takes `seconds`; a batch holding the value 123 raises."""

    def __init__(self, session, seconds):
        self.session, self.seconds = session, seconds
        self.calls = []  # (start, end) of each call, time.monotonic()
        self.started = threading.Event()

    def __call__(self, x):
        start = time.monotonic()
        self.started.set()
        time.sleep(self.seconds)  # the backend's compute
        try:
            if (x == 123.0).any():
                raise RuntimeError("backend exploded")
            return self.original(x)
        finally:
            self.calls.append((start, time.monotonic()))


def _slow(running, seconds):
    wrapper = _Slow(running.server.session, seconds)
    wrapper.original = running.server.session.infer
    running.server.session.infer = wrapper
    return wrapper


def test_a_backend_exception_fails_only_its_batch(onnx_path):
    s = Running(onnx_path, max_batch=4, max_delay_ms=0)
    _slow(s, 0.0)
    try:
        client = httpclient.InferenceServerClient(s.http)
        with pytest.raises(InferenceServerException, match="backend exploded"):
            _http_infer(client, np.full((1, 3, 32, 32), 123.0, np.float32))
        assert _http_infer(client, _x(1)).as_numpy("logits").shape == (1, 10)
        assert client.is_server_ready()
    finally:
        s.stop()


def test_short_lone_batches_run_on_the_event_loop_and_slow_ones_in_the_worker(onnx_path, reference, monkeypatch):
    """The first call is timed in the worker thread; once the recent time per row says a lone
    batch takes under INLINE_MAX_S it runs on the event loop, and once it says longer it does not."""
    from crossvit.runtime.serving import batcher

    # 50 ms while the real model is timed: on a loaded shared CI machine a call can pass 3 ms
    monkeypatch.setattr(batcher, "INLINE_MAX_S", 0.05)
    s = Running(onnx_path, max_batch=4, max_delay_ms=0)
    threads = []
    original = s.server.session.infer

    def recording(x):
        threads.append(threading.current_thread())
        return original(x)

    s.server.session.infer = recording
    try:
        client = httpclient.InferenceServerClient(s.http)
        for seed in range(12):  # the estimate starts from the first (warm-up) call and settles
            x = _x(1, seed)
            np.testing.assert_allclose(_http_infer(client, x).as_numpy("logits"), reference.infer(x), rtol=1e-5,
                                       atol=1e-5)
        assert threads[0] is not s.thread and threads[-1] is s.thread
        monkeypatch.setattr(batcher, "INLINE_MAX_S", 0.003)
        wrapper = _slow(s, 0.01)  # 10 ms a call: over INLINE_MAX_S, so back to the worker
        wrapper.original = recording
        threads.clear()
        for _ in range(6):
            assert _http_infer(client, _x(1)).as_numpy("logits").shape == (1, 10)
        assert threads[-1] is not s.thread
    finally:
        s.stop()


def test_the_batching_delay_counts_from_arrival(onnx_path):
    """--max-delay-ms bounds a request's wait for company from when it arrived (Triton's
    max_queue_delay): B, which waited out A's compute in the queue, runs at once after A
    (held again, it would start a whole delay later)."""
    s = Running(onnx_path, max_batch=4, max_delay_ms=1000)
    slow = _slow(s, 2.5)
    try:
        client = httpclient.InferenceServerClient(s.http, concurrency=2)
        a = client.async_infer("crossvit_digits", [_input(_x(1))])  # waits 1 s alone, then 2.5 s
        assert slow.started.wait(60)  # A's compute has begun
        b = client.async_infer("crossvit_digits", [_input(_x(1, 1))])  # arrives during A's compute
        a.get_result()
        b.get_result()
        (_, a_end), (b_start, _) = slow.calls
        assert b_start - a_end < 0.8, f"B started {b_start - a_end:.2f} s after A: held again after waiting out A"
    finally:
        s.stop()


def test_a_full_queue_is_refused_at_once_with_503(onnx_path):
    s = Running(onnx_path, max_batch=1, max_delay_ms=0, max_queue=2)
    _slow(s, 0.5)
    codes = []

    def call():
        codes.append(s.raw("POST", INFER, _json())[0])

    try:
        threads = [threading.Thread(target=call) for _ in range(8)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert 503 in codes and 200 in codes, codes
        assert time.perf_counter() - start < 10
    finally:
        s.stop()


def test_shutdown_answers_the_requests_in_flight_then_refuses(onnx_path):
    s = Running(onnx_path, max_batch=2, max_delay_ms=0)
    _slow(s, 0.3)
    codes = []
    threads = [threading.Thread(target=lambda: codes.append(s.raw("POST", INFER, _json())[0])) for _ in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while s.server.service.batcher.pending < 4:  # all four accepted: queued or computing
        assert time.monotonic() < deadline, "the four requests never reached the queue"
        time.sleep(0.01)
    s.stop()
    for t in threads:
        t.join(30)
    assert codes == [200] * 4


def test_shutdown_waits_for_a_request_still_decoding_its_images(onnx_path, monkeypatch):
    """SIGTERM while a BYTES request's images were being decoded used to stop the batcher under it:
    its answer never came and the server never exited. Now it is answered, then the server stops."""
    s = Running(onnx_path)
    real = s.server.session.preprocessor
    decoding = threading.Event()

    class Slow:
        input_size = real.input_size

        def __call__(self, data):
            decoding.set()
            time.sleep(0.15)
            return real(data)

    monkeypatch.setattr(s.server.session, "_preprocessor", Slow())
    png = (Path(__file__).parent.parent / "crossvit" / "assets" / "heldout")
    images = np.array([f.read_bytes() for f in sorted(png.glob("*.png"))[:4]], dtype=np.object_)
    inp = httpclient.InferInput("images", [4], "BYTES")
    inp.set_data_from_numpy(images)
    pending = httpclient.InferenceServerClient(s.http).async_infer("crossvit_digits", [inp])
    assert decoding.wait(60)  # accepted, decoding (0.6 s)
    stopper = threading.Thread(target=s.stop)
    stopper.start()
    assert pending.get_result().as_numpy("logits").shape == (4, 10)
    stopper.join(30)
    assert not stopper.is_alive(), "the server did not stop"


# -- HTTP read limits: header size, header and body deadlines, the drain's end -----------------------

def _connect(running):
    import socket

    return socket.create_connection(("127.0.0.1", running.server.http_port), timeout=5)


def _read_until_closed(sock, deadline: float, trickle: bytes | None = None) -> bytes:
    """What the server sends until it closes the connection (b"" read) or `deadline` (monotonic)
    passes; with `trickle`, one more header line is sent every 0.2 s meanwhile (a slow client)."""
    import socket

    data = b""
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        if trickle is not None:
            try:
                sock.sendall(trickle)
            except OSError:  # closed by the server: read what it said
                trickle = None
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:  # closed with bytes of ours unread: what it said came before
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the server still held the connection at the deadline; it sent {data[:200]!r}")


def _status_and_error(data: bytes) -> tuple[int, str]:
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return int(head.split()[1]), json.loads(body)["error"]


def test_request_headers_over_32_kib_get_431(server):
    """uvicorn ran httptools, which has no header size limit: a 30 MB header got 200, 400 MB took the
    server to ~900 MB for minutes. Now h11 refuses headers over 32 KiB with 431."""
    for size, status in ((16 * 1024, 200), (64 * 1024, 431), (1_000_000, 431)):
        with _connect(server) as sock:
            try:
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * size + b"\r\n\r\n")
                sock.shutdown(1)  # no more requests on it: the server closes after answering
            except OSError:  # 1 MB: the server answered and closed before reading it all (a reset)
                pass
            data = _read_until_closed(sock, time.monotonic() + 20)
        assert int(data.split()[1]) == status, data[:300]
        if status == 431:
            assert "over the 32768 byte limit" in _status_and_error(data)[1]
    assert server.raw("GET", "/v2/health/live")[0] == 200


def test_slow_headers_and_stalled_bodies_get_408_at_their_deadline(onnx_path):
    """50 clients trickling a header line a second, and 20 declaring Content-Length 5000 then sending
    10 bytes, used to be held for ever. Each now gets 408 at its deadline (1 s here; 10 s and 60 s by
    default) and is closed; a connection that never sends a byte is closed without an answer."""
    s = Running(onnx_path, header_timeout_s=1.0, body_timeout_s=1.0)
    try:
        start = time.monotonic()
        trickling = [_connect(s) for _ in range(5)]
        for sock in trickling:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")
        stalled = [_connect(s) for _ in range(3)]
        for sock in stalled:
            sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 5000\r\n\r\n" + b"0123456789")
        silent = _connect(s)
        deadline = start + 15  # 15x the timeout: a held connection fails here, not in CI's timeout
        for sock in trickling:
            status, error = _status_and_error(_read_until_closed(sock, deadline, trickle=b"X-Slow: 1\r\n"))
            assert status == 408 and "headers did not arrive within 1 s" in error
        for sock in stalled:
            status, error = _status_and_error(_read_until_closed(sock, deadline))
            assert status == 408 and "body did not arrive within 1 s" in error
        assert _read_until_closed(silent, deadline) == b""
        assert time.monotonic() - start >= 1.0  # not before the deadline
        for sock in (*trickling, *stalled, silent):
            sock.close()
        assert _http_infer(httpclient.InferenceServerClient(s.http), _x(1)).as_numpy("logits").shape == (1, 10)
    finally:
        s.stop()


def test_a_request_stalled_in_its_body_at_the_drains_end_gets_a_json_503_and_no_traceback(onnx_path):
    """When the drain ran out, uvicorn cancelled a request still waiting for its body: 500 text/plain
    and a full traceback (CancelledError) in the log. Now: 503 in JSON, and uvicorn's one line."""
    import logging

    s = Running(onnx_path, drain_seconds=1.0, body_timeout_s=60.0)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logging.getLogger("uvicorn.error").addHandler(handler)  # after uvicorn configured its logging
    try:
        sock = _connect(s)
        sock.sendall(b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n0123456789")
        assert s.raw("GET", "/v2/health/live")[0] == 200  # the stalled request is being read
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        status, error = _status_and_error(_read_until_closed(sock, time.monotonic() + 30))
        stopper.join(30)
        sock.close()
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not stopper.is_alive(), "the server did not stop"
    assert status == 503 and "stopped before this request arrived in full" in error
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]
    assert len([r for r in records if r.levelno >= logging.WARNING]) <= 1, [r.getMessage() for r in records]


def _whole_response(data: bytes) -> bool:
    head, sep, body = data.partition(b"\r\n\r\n")
    length = head.lower().partition(b"content-length: ")[2].split(b"\r\n")[0]
    return bool(sep) and len(body) >= int(length)


def test_a_kept_alive_connection_at_shutdown_gets_an_answer_not_a_reset(onnx_path):
    """uvicorn's shutdown closed idle kept-alive connections at once: a client that had just sent its
    next request on one saw the connection reset (3-39 of 48 clients calling back to back, each run,
    `scripts/serve_sigterm_trial.py --protocol http`). Now a request that comes on such a connection
    after the server stopped listening is answered (503, JSON) with `connection: close`."""
    import socket

    s = Running(onnx_path)
    sock = _connect(s)
    try:
        body = _json()
        request = (b"POST " + INFER.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        sock.sendall(request)
        first = b""
        while not _whole_response(first):
            first += sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200") and b"connection: close" not in first.lower()  # kept alive
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the server no longer listens: uvicorn's shutdown began
            try:
                socket.create_connection(("127.0.0.1", s.server.http_port), timeout=1).close()
            except OSError:
                break
            time.sleep(0.005)
        else:
            raise AssertionError("the server kept listening")
        sock.sendall(request)  # on the connection kept alive
        reply = _read_until_closed(sock, time.monotonic() + 30)
        stopper.join(30)
    finally:
        sock.close()
    assert not stopper.is_alive(), "the server did not stop"
    status, error = _status_and_error(reply)
    assert status == 503 and "not ready" in error
    assert b"connection: close" in reply.partition(b"\r\n\r\n")[0].lower()


def test_not_ready_is_503(onnx_path):
    s = Running(onnx_path)
    try:
        s.server.service.ready = False
        status, data = s.raw("POST", INFER, _json())
        assert status == 503 and "not ready" in json.loads(data)["error"]
        assert s.raw("GET", "/v2/health/ready")[0] == 400 and s.raw("GET", "/v2/health/live")[0] == 200
    finally:
        s.server.service.ready = True
        s.stop()


# -- the command -------------------------------------------------------------------------------

@pytest.mark.slow
def test_serve_command_answers_then_drains_on_sigterm(onnx_path):
    import socket

    ports = []
    for _ in range(2):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    proc = subprocess.Popen([sys.executable, "-m", "crossvit", "serve", str(onnx_path), "--http-port", str(ports[0]),
                             "--grpc-port", str(ports[1])], stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert "serving 'crossvit_digits'" in line, line
        client = httpclient.InferenceServerClient(f"127.0.0.1:{ports[0]}")
        assert _http_infer(client, _x(2)).as_numpy("logits").shape == (2, 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        # the server's own count, which lets a client check that nothing it lost had been answered
        assert "stopped (inference requests answered: 1, failed or refused: 0)" in proc.stderr.read()
    finally:
        proc.kill()


def test_serve_refuses_a_taken_port_in_one_line(onnx_path, server, cli, one_line_error):
    proc = cli("serve", onnx_path, "--http-port", server.server.http_port, "--grpc-port", "0", timeout=60)
    one_line_error(proc, "cannot listen on 127.0.0.1")


def test_serve_refuses_a_taken_grpc_port_in_one_line(onnx_path, server, cli, one_line_error):
    """grpc sets SO_REUSEPORT by default: a second server would bind the same port and take
    a share of the first one's requests."""
    proc = cli("serve", onnx_path, "--http-port", "0", "--grpc-port", server.server.grpc_port, timeout=60)
    line = one_line_error(proc, f"cannot listen on 127.0.0.1:{server.server.grpc_port} for gRPC")
    assert "in use" in line and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_serve_refuses_a_max_batch_over_the_artifacts_range(onnx_path, cli, one_line_error):
    """The ONNX takes 1..64 rows: --max-batch 1000 used to start and advertise max_batch_size 1000
    (triton-repo and the README refuse it)."""
    from crossvit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--max-batch 1000 is outside the ONNX's batch range 1\.\.64"):
        Server(onnx_path, ServeOptions(http_port=0, grpc_port=0, max_batch=1000))
    proc = cli("serve", onnx_path, "--max-batch", "1000", "--http-port", "0", "--grpc-port", "0", timeout=60)
    one_line_error(proc, "--max-batch 1000 is outside the ONNX's batch range 1..64")
    s = Running(onnx_path, max_batch=64)  # the top of the range is allowed
    try:
        assert httpclient.InferenceServerClient(s.http).get_model_config("crossvit_digits")["max_batch_size"] == 64
    finally:
        s.stop()


def test_non_loopback_host_warns_about_authentication(onnx_path, cli):
    proc = cli("serve", onnx_path, "--host", "0.0.0.0", "--http-port", "-5", timeout=60)
    assert "no authentication" in proc.stderr and proc.returncode == 1


def test_the_server_and_the_tensorrt_session_import_no_torch(onnx_path):
    code = f"""
import asyncio, sys
import crossvit.runtime.tensorrt
from crossvit.runtime.serving.server import ServeOptions, Server
import tritonclient.http as httpclient
import numpy as np

async def main():
    s = Server({str(onnx_path)!r}, ServeOptions(http_port=0, grpc_port=0))
    await s.start()
    client = httpclient.InferenceServerClient(f"127.0.0.1:{{s.http_port}}")
    inp = httpclient.InferInput("input", [1, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
    await asyncio.get_running_loop().run_in_executor(None, client.infer, "crossvit_digits", [inp])
    await s.stop()

asyncio.run(main())
print("IMPORTED", sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "crossvit.model",
                                                                                  "crossvit.export"))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMPORTED []" in proc.stdout


def test_a_server_that_cannot_start_is_an_error_not_a_hang(tmp_path):
    from crossvit.benchmarks.serve_load import _serve

    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="did not start") as e:
        with _serve(bad):
            pass
    assert "broken.onnx" in str(e.value) and time.monotonic() - t0 < 60


def test_open_loop_load_is_bounded_and_finds_the_knee(server):
    from crossvit.benchmarks.serve_load import knee, open_loop

    row = asyncio.run(open_loop(server.http, "crossvit_digits", _x(1), rate=50, seconds=1.0, max_requests=40))
    assert 0 < row["sent"] <= 40 and row["answered"] == row["sent"] and row["errors"] == 0
    assert 0 < row["p50_ms"] <= row["p99_ms"]
    rows = [{"rate": 100, "errors": 0, "p99_ms": 10}, {"rate": 200, "errors": 0, "p99_ms": 40},
            {"rate": 400, "errors": 0, "p99_ms": 90}, {"rate": 800, "errors": 3, "p99_ms": 20}]
    assert knee(rows, 50) == 200 and knee(rows, 5) is None


def test_open_loop_against_a_server_that_never_answers_counts_and_goes_on():
    """A server that accepts and never answers: the rate's requests are counted unanswered after
    the grace time (no hang, no traceback), no knee, and the result file holds every rate."""
    import socket
    import threading

    from crossvit.benchmarks.serve_load import knee, open_loop

    listener = socket.create_server(("127.0.0.1", 0))
    held = []

    def accept():
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        t0 = time.monotonic()
        row = asyncio.run(open_loop(address, "m", _x(1), rate=20, seconds=0.5, max_requests=5, grace_seconds=1.0))
        assert time.monotonic() - t0 < 20
        assert row["sent"] == row["unanswered"] > 0 and row["answered"] == 0 and knee([row], 1e9) is None
        assert row["capped_by_max_requests"] in (True, False) and row["seconds"] >= 1.0
    finally:
        listener.close()
        for conn in held:
            conn.close()


@pytest.mark.parametrize("args, words", [
    (["--rates", "abc"], "comma-separated request rates"),
    (["--rates", "0"], "positive numbers"),
    (["--rates=-5,10"], "positive numbers"),
    (["--seconds", "nan"], "a number > 0"),
    (["--max-requests", "0"], ">= 1"),
    (["--url", "127.0.0.1:9"], "give --rates too"),
    (["--url", "localhost:abc", "--rates", "5"], "the port must be a number"),
    (["--url", "10.0.0.1:8000", "--rates", "5"], "loopback"),
    (["--clients", "0"], ">= 1"),
    (["--bogus"], "unrecognized arguments"),
])
def test_serve_load_refuses_bad_arguments_in_one_line(args, words, capsys):
    from crossvit.benchmarks.serve_load import main

    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and err.count("\n") == 1, err


def test_serve_load_checks_the_url_serves_the_model_before_any_load(server, tmp_path, capsys):
    """A dead --url, or one serving another model, is one line and exit 2, and no result file."""
    import socket

    from crossvit.benchmarks.serve_load import main

    with socket.create_server(("127.0.0.1", 0)) as s:
        dead = f"127.0.0.1:{s.getsockname()[1]}"  # closed when the block ends: nobody listens there
    out = tmp_path / "out"
    for args, words in ((["--url", dead], "no Open Inference Protocol HTTP server answers"),
                        (["--url", server.http, "--model", "crossvit_tiny_240"], "no model 'crossvit_tiny_240' ready")):
        t0 = time.monotonic()
        assert main([*args, "--rates", "5", "--seconds", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
        assert not (out / "serve_open_loop.json").exists() and time.monotonic() - t0 < 30
    # the server that does serve it: the load runs and the result is written
    assert main(["--url", server.http, "--rates", "5", "--seconds", "0.5", "--out", str(out)]) == 0
    row, = json.loads((out / "serve_open_loop.json").read_text())["open_loop"]
    assert row["answered"] == row["sent"] > 0


def test_a_served_input_takes_a_batch_of_the_models_shape():
    from crossvit.benchmarks.serve_load import takes

    assert takes([-1, 3, 32, 32], (3, 32, 32)) and takes([-1, 3, -1, -1], (3, 32, 32))  # Triton's dynamic H, W
    assert not takes([-1, 3, 240, 240], (3, 32, 32)) and not takes([3, 32, 32], (3, 32, 32))
    assert not takes([-1, 1, 32, 32], (3, 32, 32))


def test_serve_load_bad_model_or_output_is_one_line_before_any_load(tmp_path, capsys):
    from crossvit.benchmarks.serve_load import main

    assert main(["--model", "nosuch", "--seconds", "1"]) == 1
    assert "nosuch" in capsys.readouterr().err
    (tmp_path / "file").write_text("x")
    t0 = time.monotonic()
    assert main(["--out", str(tmp_path / "file"), "--rates", "5", "--seconds", "1"]) == 1
    assert "not a folder" in capsys.readouterr().err and time.monotonic() - t0 < 10


def _readme_synopsis(command: str) -> str:
    """The README's synopsis of `crossvit COMMAND`: its line and the indented lines that go on with it."""
    lines = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"crossvit {command} "))
    rest = itertools.takewhile(lambda line: line.startswith("               ["), lines[start + 1:])
    return " ".join([lines[start], *rest])


@pytest.mark.parametrize("command", ["serve", "triton-repo"])
def test_the_readme_synopsis_names_every_option(command):
    """The serve synopsis used to omit --model-name, --host and --max-queue."""
    import argparse
    import re

    from crossvit.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    sub = commands.choices[command]
    synopsis = _readme_synopsis(command)
    written = set(re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", synopsis))
    for action in sub._actions:
        if action.option_strings and "--help" not in action.option_strings:
            assert written & set(action.option_strings), (command, action.option_strings, synopsis)
    known = {o for a in sub._actions for o in a.option_strings}
    assert written <= known, (command, written - known)
