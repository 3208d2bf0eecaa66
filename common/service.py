"""The request loop shared by the DSO and TSO services: register with the coordinator, then
answer each request with the handler of its type until SHUTDOWN. Every wait has a deadline."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable

from common.protocol import ANY_RUN, Envelope, Message, MsgType, ProtocolError
from common.protocol.control import Hello
from common.transport import Transport

Handler = Callable[[Envelope], Message]


def service_log(role: str) -> Callable[[str], None]:
    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {role}: {msg}", file=sys.stderr, flush=True)
    return log


def run_service(role: str, coordinator: str, timeout_s: float, idle_timeout_s: float,
                handlers: dict[MsgType, Handler], on_welcome: Callable[[dict], None] | None = None) -> int:
    """Serve requests for ``role`` ("dso" | "tso"); returns the process exit code."""
    log = service_log(role)
    transport = Transport()
    dealer = transport.dealer(coordinator, identity=role)
    try:
        hello = Hello(role=role, peer_ids=(), pid=os.getpid(), host=socket.gethostname())
        transport.send(dealer, hello.envelope(run_id=ANY_RUN, sender=role))
        _, env = transport.recv(dealer, timeout_s, waiting_for="WELCOME from the coordinator")
        if env.type != MsgType.WELCOME:
            log(f"registration refused: {env.body}")
            return 1
        config = env.body["config"]
        run_id = config["run_id"]
        transport.run_id = run_id
        if on_welcome is not None:
            on_welcome(config)
        accepted = (*handlers, MsgType.SHUTDOWN)

        def check(e: Envelope) -> None:
            if e.type not in accepted:
                raise ProtocolError("type", f"unexpected {e.type}")

        names = " or ".join(t.value.upper() for t in accepted)
        while True:
            _, env = transport.recv(dealer, idle_timeout_s, check=check, waiting_for=f"a {names} from the coordinator")
            if env.type == MsgType.SHUTDOWN:
                log(f"shutdown: {env.body.get('reason', '')}")
                return 0
            answer = handlers[env.type](env)
            transport.send(dealer, answer.envelope(run_id=run_id, sender=role, iteration=env.iteration))
    except (TimeoutError, ConnectionError) as exc:
        log(f"stopped: {exc}")
        return 1
    finally:
        if transport.rejected:
            log(f"rejected messages: {dict(transport.rejected)}")
        transport.close()
