"""A fork server for `kill -9` cycles: imports the agent once, then forks a real agent process per `start` line on
stdin and prints its pid. Each child is the real `AgentService` on its real socket and files — only the Python
start-up (seconds of imports on a small machine) is paid once, so fifty crashes fit in a minute.

Usage: python -m tests.e2e.agent_zygote AGENT_YAML   (children are reaped by the kernel: SIGCHLD ignored); a line
`start OTHER.yaml` starts one agent on another settings file (a test's own data dir or limits).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from nanofleet.agent.service import AgentService
from nanofleet.agent.settings import load_agent_settings


def main() -> None:
    config = sys.argv[1]
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    for line in sys.stdin:
        words = line.split()
        if not words or words[0] != "start":
            continue
        settings = words[1] if len(words) > 1 else config
        pid = os.fork()
        if pid == 0:  # the agent: no threads or loops exist yet in this process, so forking here is safe
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            code = 1
            try:
                asyncio.run(AgentService(load_agent_settings(settings)).run(ready=lambda _line: None))
                code = 0
            finally:
                os._exit(code)
        print(pid, flush=True)


if __name__ == "__main__":
    main()
