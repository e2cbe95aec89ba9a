# sluicegate: the release binary built on the host and exactly the shared libraries it links (from
# ldd), staged by compose/demo as rootfs/. No base image: it builds the same with or without a registry,
# and the libraries always match the binary. Runs as nobody on a read-only root filesystem.
FROM scratch
COPY rootfs/ /
USER 65534:65534
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/sluicegate"]
CMD ["--config", "/etc/sluicegate/sluicegate.yaml"]
