# The DreamSeed proxy image. Built by infra/ (context: the project root).
FROM python:3.11.10-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . && useradd --system --uid 10001 dreamseed
COPY policies ./policies
EXPOSE 8080
ENTRYPOINT ["dreamseed"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--policies", "/app/policies"]
