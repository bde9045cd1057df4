# The CPU "engine image" for the real-cluster test (tests/test_deploy.py::test_real_cluster, run by the `kind` job in
# .github/workflows/ci.yml): python + CPU torch + `transformers serve`. swiftci layers the model on top of it.
FROM python:3.11-slim
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir "transformers[serving]==5.23.*"
ENV HF_HUB_OFFLINE=1
