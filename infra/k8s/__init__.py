"""The `k8s` stack: the catalog's backends, the proxy, Postgres with pgvector and the monitoring
rules as Kubernetes objects (pulumi-kubernetes), one component per service, from the same
`policies/` as the `local` stack. docs/kubernetes.md says what runs where and what it needs."""
