"""The Open Inference Protocol (KServe v2) as Triton speaks it: requests in, responses out.

Plain functions over bytes, dicts and numpy arrays, shared by the HTTP and gRPC front ends:
they know the protocol, not the web framework. What a model accepts:

- input `input` (the artifact's input name), FP32 `[N, C, H, W]`, preprocessed, as JSON data
  (flat or nested) or in the binary tensor extension; or
- input `images` (IMAGES_INPUT), BYTES `[N, 1]` (or `[N]`): encoded image files that the server
  decodes and preprocesses with the runtime's own preprocessing.
  A request sends exactly one of the two, so both are declared `optional` in the model
  configuration (Triton's ModelInput.optional: "not required in the inference request"); any
  other input name is refused (400);
- output `logits` FP32 `[N, classes]`, as JSON or binary, or with the classification extension
  (`"classification": K`) as BYTES `[N, K]` of "score:index:label", Triton's exact format.

Errors are `ProtocolError(status, message)`; the status is Triton's HTTP status for the
case, and `GRPC_CODES` maps it for gRPC. Every part of a request is type-checked where it is
read; a request may hold at most `max_rows` rows (what the batcher can ever queue), checked
from its shape before any data is decoded or allocated; values from the request appear in
messages shortened (`_show`).
"""

from __future__ import annotations

import itertools
import json
import math
import reprlib
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np

from crossvit.errors import InputError

# Triton's HTTP statuses, and the gRPC codes (by name) it uses for the same cases.
BAD_REQUEST, NOT_FOUND, METHOD_NOT_ALLOWED, TOO_LARGE, UNAVAILABLE, INTERNAL = 400, 404, 405, 413, 503, 500
GRPC_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 405: "UNIMPLEMENTED", 413: "RESOURCE_EXHAUSTED",
              503: "UNAVAILABLE", 500: "INTERNAL"}
HEADER_LENGTH = "inference-header-content-length"
# The BYTES input of encoded image files: this server's own (the artifact's graph takes FP32 only).
IMAGES_INPUT = "images"
DTYPE_SIZES = {"FP32": 4}


class ProtocolError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlong, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 40, 8, 4, 3


def _show(value) -> str:
    """A value from the request, for a message: its repr, cut short (a name or a shape may be megabytes)."""
    return _REPR.repr(value)


def request_error(e: Exception) -> ProtocolError:
    """The last line of defence: an exception nothing foresaw while reading a request is the
    request's fault, a 400 in one short line (never a 500 or a traceback)."""
    try:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    except Exception:  # a str() that fails too
        detail = ""
    return ProtocolError(BAD_REQUEST, f"malformed request ({type(e).__name__}{': ' + detail if detail else ''})")


@dataclass
class InputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: object = None  # JSON data (list) or None when binary
    binary_size: int | None = None
    raw: bytes | None = None


@dataclass
class OutputRequest:
    name: str
    binary: bool | None = None  # None: the request's default
    classification: int | None = None


@dataclass
class InferRequest:
    id: str | None
    inputs: list[InputTensor]
    outputs: list[OutputRequest] = field(default_factory=list)
    binary_output: bool = False  # request-level "binary_data_output"


# -- decoding ---------------------------------------------------------------------------------

def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The body as sent by tritonclient (gzip or deflate allowed), never expanded past `limit`."""
    encoding = (encoding or "identity").lower()
    if encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise ProtocolError(BAD_REQUEST, f"unsupported Content-Encoding {encoding!r} (gzip, deflate)")
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(body, limit + 1)
    except zlib.error as e:
        raise ProtocolError(BAD_REQUEST, f"body is not valid {encoding} data ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ProtocolError(TOO_LARGE, f"decompressed body is over the {limit} byte limit")
    return out


def _shape(value, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                                              for v in value):
        raise ProtocolError(BAD_REQUEST, f"{what}: 'shape' must be a list of non-negative integers, "
                                         f"got {_show(value)}")
    return value


def _params(value, what: str) -> dict:
    """A 'parameters' object (absent: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(BAD_REQUEST, f"{what}: 'parameters' must be a JSON object, got {_show(value)}")
    return value


def _flag(params: dict, key: str, what: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise ProtocolError(BAD_REQUEST, f"{what}: {key} must be true or false, got {_show(value)}")
    return value


def parse_http_request(body: bytes, header_length: str | None) -> InferRequest:
    """A JSON request, or a JSON header followed by binary tensors (the binary extension)."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(BAD_REQUEST, f"bad Inference-Header-Content-Length {header_length!r}") from None
        if not 0 < n <= len(body):
            raise ProtocolError(BAD_REQUEST, f"Inference-Header-Content-Length {n} does not fit a "
                                             f"{len(body)} byte body")
        header, rest = body[:n], body[n:]
    else:
        header, rest = body, b""
    try:
        doc = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProtocolError(BAD_REQUEST, f"malformed JSON in the request ({e})") from None
    except RecursionError:
        raise ProtocolError(BAD_REQUEST, "the request's JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ProtocolError(BAD_REQUEST, "the request must be a JSON object")
    inputs_doc = doc.get("inputs")
    if not isinstance(inputs_doc, list) or not inputs_doc:
        raise ProtocolError(BAD_REQUEST, "the request needs a non-empty 'inputs' list")
    inputs, offset = [], 0
    for i, t in enumerate(inputs_doc):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not isinstance(t.get("datatype"), str):
            raise ProtocolError(BAD_REQUEST, f"inputs[{i}] needs 'name', 'datatype' and 'shape'")
        what = f"input {_show(t['name'])}"
        params = _params(t.get("parameters"), what)
        tensor = InputTensor(name=t["name"], datatype=t["datatype"], shape=_shape(t.get("shape"), what))
        size = params.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError(BAD_REQUEST, f"{what}: bad binary_data_size {_show(size)}")
            if offset + size > len(rest):
                raise ProtocolError(BAD_REQUEST, f"{what}: binary data truncated ({len(rest) - offset}"
                                                 f" bytes left, binary_data_size says {size})")
            tensor.raw, offset = rest[offset:offset + size], offset + size
        elif "data" in t:
            tensor.data = t["data"]
        else:
            raise ProtocolError(BAD_REQUEST, f"{what} has neither 'data' nor binary_data_size")
        inputs.append(tensor)
    if offset != len(rest):
        raise ProtocolError(BAD_REQUEST, f"{len(rest) - offset} bytes of binary data after the last tensor")
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, (str, int)) or isinstance(request_id, bool)):
        raise ProtocolError(BAD_REQUEST, f"the request's 'id' must be a string, got {_show(request_id)}")
    binary_output = _flag(_params(doc.get("parameters"), "the request"), "binary_data_output", "the request")
    request = InferRequest(id=None if request_id is None else str(request_id), inputs=inputs,
                           binary_output=bool(binary_output))
    outputs_doc = doc.get("outputs")
    if outputs_doc is not None and not isinstance(outputs_doc, list):
        raise ProtocolError(BAD_REQUEST, f"'outputs' must be a list of {{\"name\": ...}} objects, "
                                         f"got {_show(outputs_doc)}")
    for o in outputs_doc or []:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise ProtocolError(BAD_REQUEST, "each requested output needs a 'name'")
        what = f"output {_show(o['name'])}"
        p = _params(o.get("parameters"), what)
        request.outputs.append(OutputRequest(name=o["name"], binary=_flag(p, "binary_data", what),
                                             classification=_classification(p.get("classification"), what)))
    return request


def _classification(value, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ProtocolError(BAD_REQUEST, f"{what}: classification must be an integer >= 1, got {_show(value)}")
    return value


def deserialize_bytes(raw: bytes, what: str, limit: int | None = None) -> list[bytes]:
    """BYTES tensor contents: each element a 4-byte little-endian length, then the bytes; more
    than `limit` elements is refused as soon as it is seen."""
    out, i = [], 0
    while i < len(raw):
        if limit is not None and len(out) >= limit:
            raise ProtocolError(BAD_REQUEST, f"{what}: more than the {limit} BYTES elements its shape says")
        if i + 4 > len(raw):
            raise ProtocolError(BAD_REQUEST, f"{what}: truncated BYTES element length")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ProtocolError(BAD_REQUEST, f"{what}: BYTES element {len(out)} truncated")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# -- the model's view ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelView:
    """What the protocol needs to know of the model (from the session's ArtifactInfo)."""

    name: str
    version: str
    input_name: str
    input_shape: tuple[int, int, int]
    output_name: str
    labels: tuple[str, ...]
    platform: str
    images_name: str = IMAGES_INPUT

    def metadata(self) -> dict:
        """Both inputs (a request sends one of them: the model configuration marks both optional)."""
        return {"name": self.name, "versions": [self.version], "platform": self.platform,
                "inputs": [{"name": self.input_name, "datatype": "FP32", "shape": [-1, *self.input_shape]},
                           {"name": self.images_name, "datatype": "BYTES", "shape": [-1, 1]}],
                "outputs": [{"name": self.output_name, "datatype": "FP32", "shape": [-1, len(self.labels)]}]}

    def takes(self) -> str:
        """The inputs, for a message."""
        c, h, w = self.input_shape
        return (f"{self.input_name!r} (FP32 [N, {c}, {h}, {w}]) or {self.images_name!r} "
                "(BYTES [N, 1] of encoded image files)")


def _has_booleans(data: list, probe: np.ndarray) -> bool:
    """Whether JSON numbers `data` (a rectangular nested list: `probe` is its numeric array) hide
    a true or false (numpy reads [0.5, true] as [0.5, 1.0]; Triton refuses it). Scanned only
    where some value is exactly 0 or 1. Measured on one 240-px image: the 0/1 probe costs 0.4 %
    of the JSON parse; the scan, where it runs, 11 % (flat) to 15 % (nested)."""
    if not ((probe == 0) | (probe == 1)).any():
        return False
    values = data
    for _ in range(probe.ndim - 1):
        values = itertools.chain.from_iterable(values)
    return bool in set(map(type, values))


def to_batch(request: InferRequest, model: ModelView, preprocess, max_rows: int | None = None) -> np.ndarray:
    """The request's one input as the model's float32 batch; images decoded with `preprocess`
    (a runtime Preprocessor) when the input is BYTES. More than `max_rows` rows (N) is refused
    from the shape alone, before any data is decoded or allocated."""
    if len(request.inputs) != 1:
        raise ProtocolError(BAD_REQUEST, f"a request sends exactly one input, {model.takes()}; "
                                         f"got {len(request.inputs)}")
    t = request.inputs[0]
    for o in request.outputs:
        if o.name != model.output_name:
            raise ProtocolError(BAD_REQUEST, f"unknown output {_show(o.name)}; the model has {model.output_name!r}")
    name = _show(t.name)
    if t.name not in (model.input_name, model.images_name):
        raise ProtocolError(BAD_REQUEST, f"unknown input {name}; the model takes {model.takes()}")
    if t.name == model.images_name:
        if t.datatype != "BYTES":
            raise ProtocolError(BAD_REQUEST, f"input {name} must be BYTES (encoded image files), got "
                                             f"{_show(t.datatype)}; send preprocessed FP32 as {model.input_name!r}")
        return _images(t, preprocess, max_rows)
    if t.datatype != "FP32":
        raise ProtocolError(BAD_REQUEST, f"input {name} must be FP32, got {_show(t.datatype)}"
                            + (f"; send encoded images as {model.images_name!r}" if t.datatype == "BYTES" else ""))
    c, h, w = model.input_shape
    if len(t.shape) != 4 or tuple(t.shape[1:]) != (c, h, w) or t.shape[0] < 1:
        raise ProtocolError(BAD_REQUEST, f"input {name} must have shape [N, {c}, {h}, {w}] with N >= 1, "
                                         f"got {_show(t.shape)}")
    _check_rows(t, max_rows)
    count = math.prod(t.shape)  # a Python int: np.prod would wrap around past int64
    if t.raw is not None:
        if len(t.raw) != count * 4:
            raise ProtocolError(BAD_REQUEST, f"input {name}: {len(t.raw)} bytes of data for shape {_show(t.shape)} "
                                             f"(expected {count * 4})")
        x = np.frombuffer(t.raw, dtype="<f4").reshape(t.shape)
    else:
        try:
            with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below
                probe = np.asarray(t.data)  # numpy would read "1.5" or true as a number: Triton does not
                if probe.dtype.kind in "bUS" or (probe.dtype.kind in "iuf" and _has_booleans(t.data, probe)):
                    raise ProtocolError(BAD_REQUEST, f"input {name}: 'data' must be numbers, not strings "
                                                     "or booleans")
                x = probe.astype(np.float32) if probe.dtype.kind in "iuf" else np.asarray(t.data, dtype=np.float32)
        except OverflowError:  # an integer too large even for a float64
            raise ProtocolError(BAD_REQUEST, f"input {name}: 'data' holds a number beyond FP32's range") from None
        except (TypeError, ValueError):
            raise ProtocolError(BAD_REQUEST, f"input {name}: 'data' must be numbers") from None
        if x.size != count:
            raise ProtocolError(BAD_REQUEST, f"input {name}: {x.size} values for shape {_show(t.shape)} "
                                             f"(expected {count})")
        x = x.reshape(t.shape)
    if not np.isfinite(x).all():
        raise ProtocolError(BAD_REQUEST, f"input {name} holds NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


# A BYTES request's images become one float32 batch: a small body of small images must not become
# gigabytes (a 240-px CrossViT input is 675 KiB per image: 388 images per request at this limit).
MAX_DECODED_BYTES = 256 << 20


def _check_rows(t: InputTensor, max_rows: int | None) -> None:
    """A request the server could never take whole is refused now (400, not a 503 to retry)."""
    if max_rows is not None and t.shape[0] > max_rows:
        raise ProtocolError(BAD_REQUEST, f"input {_show(t.name)}: {_show(t.shape[0])} rows is over this server's "
                                         f"limit of {max_rows} per request (--max-batch x --max-queue); "
                                         "split the request")


def _images(t: InputTensor, preprocess, max_rows: int | None) -> np.ndarray:
    name = _show(t.name)
    if not (len(t.shape) == 1 or len(t.shape) == 2 and t.shape[1] == 1) or t.shape[0] < 1:
        raise ProtocolError(BAD_REQUEST, f"BYTES input {name} must have shape [N, 1] (or [N]), got {_show(t.shape)}")
    _check_rows(t, max_rows)
    n = t.shape[0]
    decoded = n * 4 * math.prod(preprocess.input_size)  # the float32 batch the images become
    if decoded > MAX_DECODED_BYTES:
        raise ProtocolError(TOO_LARGE, f"BYTES input {name}: {n} images decode to {decoded / 2**20:.0f} MiB of "
                                       f"float32, over the {MAX_DECODED_BYTES >> 20} MiB per request; split the request")
    if t.raw is not None:
        items = deserialize_bytes(t.raw, f"input {name}", limit=n)
    elif isinstance(t.data, list):
        flat = []  # [N] flat, or [N, 1] nested one level
        for d in t.data:
            if isinstance(d, list):
                flat.extend(d)
            else:
                flat.append(d)
        if not all(isinstance(d, str) for d in flat):
            raise ProtocolError(BAD_REQUEST, f"BYTES input {name}: JSON data must be strings")
        if len(flat) != n:
            raise ProtocolError(BAD_REQUEST, f"BYTES input {name}: {len(flat)} elements for shape {_show(t.shape)}")
        items = [d.encode("latin-1", errors="replace") for d in flat]
    else:
        raise ProtocolError(BAD_REQUEST, f"BYTES input {name}: 'data' must be a list")
    if len(items) != n:
        raise ProtocolError(BAD_REQUEST, f"BYTES input {name}: {len(items)} elements for shape {_show(t.shape)}")
    out = np.empty((n, *preprocess.input_size), np.float32)
    for i, item in enumerate(items):
        try:
            out[i] = preprocess(item)
        except InputError as e:
            message = str(e).replace("<bytes>: ", "")
            raise ProtocolError(BAD_REQUEST, f"BYTES input {name} element {i} is not a usable image: "
                                             f"{message}") from None
    return out


# -- encoding -----------------------------------------------------------------------------------

def classify(logits: np.ndarray, k: int, labels: tuple[str, ...]) -> list[bytes]:
    """Triton's classification extension: per row the top k as "score:index:label", highest first,
    the score printed like C++ std::to_string (six decimals)."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [f"{logits[r, i]:f}:{i}:{labels[i]}".encode() for r in range(len(logits)) for i in top[r]]


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    array: np.ndarray | None = None  # FP32
    items: list[bytes] | None = None  # BYTES

    def raw(self) -> bytes:
        return self.array.astype("<f4").tobytes() if self.array is not None else serialize_bytes(self.items)

    def json_data(self) -> list:
        if self.array is not None:
            return self.array.reshape(-1).tolist()
        return [b.decode("utf-8", errors="replace") for b in self.items]


def outputs_for(request: InferRequest, logits: np.ndarray, model: ModelView) -> list[tuple[OutputTensor, bool]]:
    """The requested outputs (all of them when none is named), each with whether to send it binary."""
    wanted = request.outputs or [OutputRequest(model.output_name)]
    out = []
    for o in wanted:
        binary = request.binary_output if o.binary is None else bool(o.binary)
        if o.classification:
            k = min(o.classification, logits.shape[1])
            t = OutputTensor(o.name, "BYTES", [len(logits), k], items=classify(logits, k, model.labels))
        else:
            t = OutputTensor(o.name, "FP32", list(logits.shape), array=logits)
        out.append((t, binary))
    return out


def http_response(request: InferRequest, logits: np.ndarray, model: ModelView) -> tuple[bytes, dict]:
    """(body, extra headers): JSON, or JSON header + binary tensors when any output is binary."""
    doc = {"model_name": model.name, "model_version": model.version, "outputs": []}
    if request.id is not None:
        doc["id"] = request.id
    blobs = []
    for t, binary in outputs_for(request, logits, model):
        entry = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if binary:
            blob = t.raw()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = t.json_data()
        doc["outputs"].append(entry)
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not blobs:
        return header, {"content-type": "application/json"}
    return header + b"".join(blobs), {"content-type": "application/octet-stream",
                                      HEADER_LENGTH: str(len(header))}
