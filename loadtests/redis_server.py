"""Debian's `redis-server` on a free loopback port with its own temp dir: the GCS's external store in the head-loss
tests (started and stopped by whoever made it, never the system service)."""

import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

from deployments.localrun import free_port


class RedisServer:
    """One redis-server process: loopback only, a password, no snapshots on disk but its own dir for anything else."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.port = free_port()
        self.password = secrets.token_hex(16)
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 20) -> "RedisServer":
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install -y redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        # The password on the command line would show in `ps`; a config file in the temp dir keeps it out.
        conf = self.dir / "redis.conf"
        conf.write_text(f"bind 127.0.0.1\nport {self.port}\ndir {self.dir}\nrequirepass {self.password}\n"
                        "save \"\"\nappendonly no\nprotected-mode yes\ndaemonize no\n")
        conf.chmod(0o600)
        self.log = open(self.dir / "redis.log", "wb")  # noqa: SIM115 (open while the server runs; closed in stop)
        self.process = subprocess.Popen([binary, str(conf)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()[-800:]}")
            if self.ping():
                return self
            time.sleep(0.1)
        raise TimeoutError(f"redis-server not answering on {self.address} after {timeout_s}s")

    def command(self, *args: str) -> bytes:
        """One RESP command (AUTH first) on a fresh connection; the raw reply."""
        def encode(parts) -> bytes:
            out = [f"*{len(parts)}\r\n".encode()]
            for p in parts:
                b = p.encode()
                out.append(b"$%d\r\n%s\r\n" % (len(b), b))
            return b"".join(out)

        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(encode(["AUTH", self.password]) + encode(list(args)))
            reply = b""
            while reply.count(b"\r\n") < 2:
                chunk = s.recv(65536)
                if not chunk:
                    break
                reply += chunk
        return reply.split(b"\r\n", 1)[1]

    def ping(self) -> bool:
        try:
            return self.command("PING").startswith(b"+PONG")
        except OSError:
            return False

    def key_count(self) -> int:
        """How many keys the GCS wrote (its tables live in one hash per table and namespace)."""
        return int(self.command("DBSIZE").strip().lstrip(b":").split(b"\r\n")[0])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if getattr(self, "log", None):
            self.log.close()
        self.process = None
