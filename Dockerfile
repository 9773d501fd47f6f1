# The image of the k8s/ manifests: the Ray base image (the Ray and Python versions the project pins) plus crosstrim
# installed with constraints.txt, so `deployments.app:build_app` and `crosstrim` work in every Ray pod.
#
# GPU (RayService / RayJob):
#   docker build -t crosstrim:0.1.0-ray2.60.0-py311-gpu .
# CPU-only demo (kind/minikube; the CPU torch wheel instead of the multi-GB CUDA one):
#   docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t crosstrim:0.1.0-ray2.60.0-py311-cpu .
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

# Empty: torch comes from PyPI (CUDA build, bundles its own CUDA runtime; needs only the node's NVIDIA driver).
ARG TORCH_INDEX_URL=""

# GET /version reports the code's revision: `--build-arg CROSSTRIM_REVISION=$(git rev-parse HEAD)` (no .git in here).
ARG CROSSTRIM_REVISION=""
ENV CROSSTRIM_REVISION=${CROSSTRIM_REVISION}

# The Ray images run as user ray (uid 1000, gid 100); configs/ and loadtests/ stay here for the RayJob and locust Job.
WORKDIR /home/ray/crosstrim
COPY --chown=1000:100 . .

# constraints.txt keeps Ray at the version the base image already has and torch/transformers at the tested versions.
RUN pip install --no-cache-dir -c constraints.txt ${TORCH_INDEX_URL:+--extra-index-url ${TORCH_INDEX_URL}} . \
    && python -c "import re, ray, deployments, pipeline.cli; \
pin = re.search(r'^ray==(\S+)', open('constraints.txt').read(), re.M).group(1); \
assert ray.__version__ == pin, f'image has ray {ray.__version__}, constraints.txt pins {pin}: fix BASE_IMAGE'" \
    && crosstrim --help > /dev/null
