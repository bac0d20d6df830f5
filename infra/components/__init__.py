"""One Pulumi ComponentResource per service; the stack programs in infra/program.py compose them."""
