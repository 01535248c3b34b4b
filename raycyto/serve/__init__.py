"""raycyto.serve: serve exported bundles (Ray Serve) or predict offline.

Public API (import from the submodules; nothing heavy is imported here; ``raycyto export``
lives in :mod:`raycyto.export`, the referral rule in :mod:`raycyto.referral.policy`):

- ``app.build_app(args: AppArgs) -> Application``: typed Serve application builder
  (``import_path: raycyto.serve.app:build_app``): Ingress (FastAPI) -> Backbone
  (``@serve.batch``) -> MCHead replicas.
- ``api.build_api(backend, settings) -> FastAPI``: ``/predict``, OIP v2, auth, error mapping.
- ``predict.LocalPredictor(model_dir).predict_bytes(data, passes=, threshold=, seed=, fan_out=)``:
  the same JSON as ``/predict``, in-process.
- ``validation``: body-size middleware, format sniffing, ``ClientError`` -> JSON 4xx.

Fan-out default (chunks per request), from ``benchmarks/serve_latency.py``: head scope
-> 1 chunk (T=100 head passes take well under a millisecond, so a second chunk only adds
an RPC: 0.95x); full scope -> one chunk per MC-head replica (each pass runs the whole
network: 1.47x faster with 2 chunks on 2 replicas for T=8 on 2 CPUs).
"""
