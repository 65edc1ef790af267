# Podman/Docker image for the standard module file-copy (same content as file-copy.def). No registry: the build
# context's rootfs/ is made offline by containers/rootfs.sh, as the directive below asks.
# scalebox-rootfs: bash rsync ssh?
FROM scratch
COPY rootfs/ /
CMD ["/bin/sh"]
