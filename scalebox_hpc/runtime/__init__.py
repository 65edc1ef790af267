"""Container runtimes: how a module script is started (bare process, Apptainer, Docker, Podman)."""
