"""A local port that reaches a pod through the Kubernetes API's port-forward, like `kubectl port-forward`, so the
smoke test can talk to the NEW pods from the CI runner without an ingress."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


class Forward:
    def __init__(self, url: str):
        self.url = url
        self.errors: list[str] = []  # why connections could not be forwarded, for the smoke test's report


@contextlib.contextmanager
def forward(cluster, namespace: str, pod: str, port: int) -> Iterator[Forward]:
    """Yield a Forward whose `url` is `http://127.0.0.1:<local port>/v1`; every accepted connection gets its own
    port-forward stream. A stream that cannot be opened closes that connection and is recorded in `errors`;
    every stream is closed on exit."""
    from kubernetes.stream import portforward

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.5)
    stop = threading.Event()
    fw = Forward(f"http://127.0.0.1:{listener.getsockname()[1]}/v1")
    streams: list = []

    def pump(src, dst) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                pf = portforward(cluster.core.connect_get_namespaced_pod_portforward, pod, namespace,
                                 ports=str(port))
                streams.append(pf)
                remote = pf.socket(port)
                remote.setblocking(True)
            except Exception as e:  # noqa: BLE001 - RBAC refusal, pod gone, API unreachable: say so, keep serving
                fw.errors.append(f"port-forward to {namespace}/{pod}:{port}: {type(e).__name__}: {e}"[:300])
                conn.close()
                continue
            threading.Thread(target=pump, args=(conn, remote), daemon=True).start()
            threading.Thread(target=pump, args=(remote, conn), daemon=True).start()

    thread = threading.Thread(target=serve, name="swiftci-port-forward", daemon=True)
    thread.start()
    try:
        yield fw
    finally:
        stop.set()
        thread.join(timeout=2)
        listener.close()
        for pf in streams:
            with contextlib.suppress(Exception):
                pf.close()
