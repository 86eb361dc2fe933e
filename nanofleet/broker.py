"""The fleet's MQTT broker on one node: Mosquitto when it is installed, else an embedded amqtt broker.

Nothing is open: anonymous clients are refused, every client has a password, and the ACL confines a device to its
own topics (it may write status, telemetry and cmd/result, and read policy and cmd, only under its own device id);
the controller user may read and write the whole fleet. `nanofleet enroll` adds devices; `nanofleet up` starts it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pwd
import secrets
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from nanofleet.protos import topics

CONTROLLER_USER = "controller"
_DEVICE_WRITES = ("status", "telemetry", "cmd/result")
_DEVICE_READS = ("policy", "cmd")


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


# Iterations of mosquitto_passwd in Mosquitto 2.0 (PW_DEFAULT_ITERATIONS). The passwords are 192-bit random tokens,
# not guessable words: a slow hash buys nothing against guessing them, and the broker pays the hash at every CONNECT.
MOSQUITTO_ITERATIONS = 101


def mosquitto_password_hash(password: str, iterations: int = MOSQUITTO_ITERATIONS) -> str:
    """The `$7$` PBKDF2-SHA512 format that `mosquitto_passwd` writes (Mosquitto 2.x)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def amqtt_password_hash(password: str) -> str:
    """An argon2id hash amqtt verifies (its parameters travel in the hash). Light parameters (1 pass, 1 MiB) for
    the reason above: pwdlib's defaults cost ~0.1-0.7 s a hash here, hours for a simulated fleet of 10,000."""
    from pwdlib.hashers.argon2 import Argon2Hasher  # installed with amqtt

    return Argon2Hasher(time_cost=1, memory_cost=1024, parallelism=1).hash(password)


_HASHERS = {"mosquitto": mosquitto_password_hash, "amqtt": amqtt_password_hash}


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


@dataclass
class BrokerAccounts:
    """Usernames and passwords of one fleet's broker, kept (0600) in the state folder so restarts reuse them."""

    state_dir: Path
    fleet: str

    @property
    def path(self) -> Path:
        return self.state_dir / "broker" / "accounts.json"

    def load(self) -> dict[str, dict[str, str]]:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def ensure(self, username: str, role: str) -> str:
        """Return the password of `username`, creating the account (role `controller` or `device`) if new."""
        return self.ensure_many([username], role)[username]

    def ensure_many(self, usernames: list[str], role: str) -> dict[str, str]:
        """`ensure` for many accounts in one write, each with its own password (and its mosquitto hash, made once
        here rather than at every config write: 10,000 of them cost seconds)."""
        if role == "device":
            for username in usernames:
                topics.check_id(username, "device")
        accounts = self.load()
        new = [u for u in usernames if u not in accounts]
        for username in new:
            password = secrets.token_urlsafe(24)
            accounts[username] = {"role": role, "password": password, "mosquitto": mosquitto_password_hash(password)}
        if new:
            self._save(accounts)
        return {u: accounts[u]["password"] for u in usernames}

    def credentials_file(self, usernames: list[str], name: str) -> Path:
        """Write {username: password} of these device accounts (created if new) to a 0600 file in the broker
        folder, for a process that logs in as all of them (the simulator); return its path."""
        path = self.state_dir / "broker" / name
        _write_private(path, json.dumps(self.ensure_many(usernames, "device"), indent=0))
        return path

    def hashes(self, kind: str) -> dict[str, str]:
        """username -> password hash for broker `kind` (mosquitto | amqtt), made once per account and kept."""
        accounts = self.load()
        missing = [u for u, a in accounts.items() if kind not in a]
        for username in missing:
            accounts[username][kind] = _HASHERS[kind](accounts[username]["password"])
        if missing:
            self._save(accounts)
        return {u: a[kind] for u, a in accounts.items()}

    def _save(self, accounts: dict[str, dict[str, str]]) -> None:
        _write_private(self.path, json.dumps(accounts, indent=2, sort_keys=True))

    def remove(self, username: str) -> bool:
        accounts = self.load()
        if accounts.pop(username, None) is None:
            return False
        self._save(accounts)
        return True


def device_acl_topics(fleet: str, device: str) -> tuple[list[str], list[str]]:
    """(topics the device may publish, topics it may subscribe to)."""
    return ([f"{topics.ROOT}/{fleet}/{device}/{k}" for k in _DEVICE_WRITES],
            [f"{topics.ROOT}/{fleet}/{device}/{k}" for k in _DEVICE_READS])


def _keep_file(path: Path, text: str) -> None:
    """Rewrite a file another program owns (a separately run mosquitto's) in place: its owner, group and mode
    stay as the operator set them; a new one is made 0640 (readable by the broker's group)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        os.close(fd)
    with path.open("r+", encoding="utf-8") as f:
        f.write(text)
        f.truncate()


def write_mosquitto_auth(accounts: BrokerAccounts, passwd: Path, acl_path: Path, *, keep: bool = False,
                         drop: tuple[str, ...] = ()) -> None:
    """Write the password file and ACL of every account. `keep`: files a separate broker owns, rewritten in place
    with the lines of users nanofleet does not manage kept, those of `drop` (revoked) removed, and our ACL lines
    added where missing; else private files of ours, wholly ours."""
    hashes = accounts.hashes("mosquitto")
    fleet_root = f"{topics.ROOT}/{accounts.fleet}"
    acl = [f"user {CONTROLLER_USER}", f"topic readwrite {fleet_root}/#", ""]
    # Patterns apply to every user; %u is the username, which for a device is its device id.
    acl += [f"pattern write {fleet_root}/%u/{k}" for k in _DEVICE_WRITES]
    acl += [f"pattern read {fleet_root}/%u/{k}" for k in _DEVICE_READS]
    ours = "".join(f"{u}:{h}\n" for u, h in sorted(hashes.items()))
    if not keep:
        _write_private(passwd, ours)
        _write_private(acl_path, "\n".join(acl) + "\n")
        return
    # only device accounts: the controller's account in the operator's broker is the operator's to set
    roles = {u: a["role"] for u, a in accounts.load().items()}
    hashes = {u: h for u, h in hashes.items() if roles.get(u) == "device"}
    ours = "".join(f"{u}:{h}\n" for u, h in sorted(hashes.items()))
    old = passwd.read_text(encoding="utf-8").splitlines() if passwd.exists() else []
    foreign = [line for line in old if line.strip() and line.split(":", 1)[0] not in {*hashes, *drop}]
    _keep_file(passwd, "".join(f"{line}\n" for line in foreign) + ours)
    old_acl = acl_path.read_text(encoding="utf-8") if acl_path.exists() else ""
    present = {line.strip() for line in old_acl.splitlines()}
    missing = [line for line in acl if line and line not in present]
    if missing or not acl_path.exists():
        sep = "" if not old_acl or old_acl.endswith("\n") else "\n"
        _keep_file(acl_path, old_acl + sep + "\n".join(missing) + "\n")


def write_mosquitto_config(accounts: BrokerAccounts, host: str, port: int) -> Path:
    """Write mosquitto.conf, its password file and ACL into state/broker; return the config path."""
    folder = accounts.state_dir / "broker"
    write_mosquitto_auth(accounts, folder / "passwd", folder / "acl")
    (folder / "data").mkdir(exist_ok=True, mode=0o700)
    conf = [
        # As root, mosquitto would switch to the `mosquitto` user and lose access to our 0600 files; stay who we are.
        f"user {pwd.getpwuid(os.getuid()).pw_name}",
        f"listener {port} {host}",
        # No cap on this listener's clients (a simulated fleet is thousands): the open-file limit is the bound, and
        # `nanofleet up` raises it to the hard limit before starting the broker.
        "max_connections -1",
        "allow_anonymous false",
        f"password_file {folder / 'passwd'}",
        f"acl_file {folder / 'acl'}",
        "persistence true",  # retained status/policy and persistent sessions survive a broker restart
        f"persistence_location {folder / 'data'}/",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        # A controller that is down keeps its share of the fleet's telemetry queued in its persistent session until
        # it is back (controller/ingest.py, durable; mosquitto keeps routing $share messages to it): room for a
        # restart's worth at fleet rates (~30 MB at most), not for a controller gone for good.
        "max_queued_messages 100000",
        # ... and a session whose client never returns (a controller host gone for good) is forgotten after an hour,
        # with what was queued for it: the bound on what a lost $share member can hold back.
        "persistent_client_expiration 1h",
        # The controller acknowledges telemetry only once it is stored: the broker must let a batch's worth and more
        # be unacknowledged at once (mosquitto's default of 20 would hold ingest to ~20 messages a batch).
        "max_inflight_messages 20000",
    ]
    _write_private(folder / "mosquitto.conf", "\n".join(conf) + "\n")
    return folder / "mosquitto.conf"


def write_amqtt_config(accounts: BrokerAccounts, host: str, port: int) -> Path:
    """The same accounts and ACL for the embedded amqtt broker (argon2 password file, per-user topic lists)."""
    import yaml

    folder = accounts.state_dir / "broker"
    hashes = accounts.hashes("amqtt")
    users = accounts.load()
    _write_private(folder / "amqtt-passwd", "".join(f"{u}:{h}\n" for u, h in sorted(hashes.items())))
    fleet_root = f"{topics.ROOT}/{accounts.fleet}"
    publish: dict[str, list[str]] = {}
    subscribe: dict[str, list[str]] = {}
    for user, account in users.items():
        if account["role"] == "controller":
            publish[user] = subscribe[user] = [f"{fleet_root}/#"]
        else:
            publish[user], subscribe[user] = device_acl_topics(accounts.fleet, user)
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": False},
            "amqtt.plugins.authentication.FileAuthPlugin": {"password_file": str(folder / "amqtt-passwd")},
            "amqtt.plugins.topic_checking.TopicAccessControlListPlugin": {"publish_acl": publish, "acl": subscribe},
        },
    }
    _write_private(folder / "amqtt.yaml", yaml.safe_dump(config, sort_keys=True))
    return folder / "amqtt.yaml"


def broker_command(accounts: BrokerAccounts, host: str, port: int,
                   kind: str = "auto") -> tuple[list[str], str]:
    """The command line that starts the fleet's broker (`auto`: mosquitto when installed, else amqtt), and a line
    saying which broker it is."""
    binary = mosquitto_binary() if kind in ("auto", "mosquitto") else None
    if kind == "mosquitto" and binary is None:
        raise FileNotFoundError("mosquitto is not installed: apt-get install -y mosquitto")
    if binary:
        conf = write_mosquitto_config(accounts, host, port)
        return [binary, "-c", str(conf)], f"mosquitto ({binary}) on {host}:{port}"
    conf = write_amqtt_config(accounts, host, port)
    amqtt = Path(sys.executable).with_name("amqtt")
    why = ("as asked" if kind == "amqtt"
           else "mosquitto not found on PATH; apt-get install -y mosquitto to use it")
    return [str(amqtt), "-c", str(conf)], f"embedded amqtt on {host}:{port} ({why})"
