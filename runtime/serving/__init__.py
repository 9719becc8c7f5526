"""`crossvit serve`: one artifact behind the Open Inference Protocol (KServe v2), over HTTP and gRPC,
as Triton speaks it, with dynamic batching. Needs the `[serve]` extra; imports no torch.

    protocol.py       requests in, responses out (JSON, binary extension, BYTES images, classification)
    batcher.py        dynamic batching over one session
    stats.py          Prometheus metrics and Triton's statistics extension
    service.py        the model behind both front ends
    rest.py           HTTP/REST (Starlette on uvicorn)
    http11.py         the HTTP/1.1 connection: uvicorn's h11 with a header size limit and read deadlines
    grpc_service.py   gRPC (grpcio asyncio, tritonclient's generated servicer)
    server.py         both on one event loop, signals, draining
"""
