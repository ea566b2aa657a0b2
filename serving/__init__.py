"""Ray Serve application that hosts raygen generators over HTTP.

Entry points: `raygen serve` (`raygen.jobs.cmd_serve`), and for Serve's own
CLI `raygen.serving.app:build_app` or `serving/config.yaml`.
See docs/serving.md. Nothing is imported here so that `import raygen.serving`
stays cheap (Ray and FastAPI load with `raygen.serving.app`).
"""
