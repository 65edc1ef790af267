# Podman/Docker image for the standard module list-dir (same content as list-dir.def). No registry: the build
# context's rootfs/ is made offline by containers/rootfs.sh, as the directive below asks.
# scalebox-rootfs: bash rsync ssh?
FROM scratch
COPY rootfs/ /
CMD ["/bin/sh"]
