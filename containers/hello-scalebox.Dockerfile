# Podman/Docker image for hello-scalebox (same content as hello-scalebox.def). No registry: the build context's
# rootfs/ is made offline by containers/rootfs.sh, as the directive below asks.
# scalebox-rootfs: bash
FROM scratch
COPY rootfs/ /
CMD ["/bin/sh"]
