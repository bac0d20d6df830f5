"""DreamSeed's infrastructure as code: Pulumi programs for the `local` and `remote70b` stacks.

Everything about the backends (models, ports, GPU shares, images, vLLM arguments) comes
from `policies/backends.yaml` through `dreamseed.policy`, the schema the proxy reads too.
"""
