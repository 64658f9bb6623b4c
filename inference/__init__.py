"""The model side of the img2img service: requests in, images out.

Nothing here imports Ray, FastAPI, MinIO or Prometheus; torch and diffusers are imported only by
``engine``, ``pipelines`` and ``tiny``, so the serving layer can validate requests without them.
"""
