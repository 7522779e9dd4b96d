"""Container tests: OCI import/export units, unionfs run, podman/buildah end to end."""
