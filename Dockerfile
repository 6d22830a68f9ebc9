# The image the k8s/ manifests run (head, workers and the build-models init container).
# onnxruntime-gpu 1.31 targets CUDA 13 + cuDNN 9: start from NVIDIA's CUDA 13 runtime with
# cuDNN; on CPU-only nodes the same image runs the CPU execution provider ("auto" never asks
# for CUDA where no device is visible).
FROM nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev bash wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
# dependencies first (cached layer), then the project itself, from pyproject.toml
COPY pyproject.toml README.md ./
COPY models ./models
COPY serving ./serving
COPY telemetry ./telemetry
COPY ecoserve ./ecoserve
RUN pip install --upgrade pip && pip install ".[build]"

# KubeRay starts Ray with bash (`ray start ...`); Serve's HTTP port and Ray's metrics port
EXPOSE 8000 8080
RUN useradd --create-home --uid 1000 ray && mkdir -p /models && chown ray /models
USER ray
CMD ["ecoserve", "--help"]
