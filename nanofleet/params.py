"""Command-line parameter types shared by every `nanofleet` command: ids are checked once, here, against the topic
scheme (`protos/topics.py`), so a bad one is a usage error naming the argument (exit 2), never a traceback."""

from __future__ import annotations

import click

from nanofleet.protos import topics


class TopicId(click.ParamType):
    """A fleet or device id: one MQTT topic level (no '/', no wildcards, no leading '$'), 1-128 characters."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.name = f"{what} id"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return topics.check_id(str(value), self.what)
        except topics.TopicError as exc:
            self.fail(str(exc), param, ctx)


FLEET_ID = TopicId("fleet")
DEVICE_ID = TopicId("device")


class BrokerUrl(click.ParamType):
    """mqtt://host[:port] or mqtts://host[:port]."""

    name = "broker url"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from nanofleet.mqtt import MqttUrlError, parse_broker_url

        try:
            parse_broker_url(str(value))
        except MqttUrlError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


BROKER_URL = BrokerUrl()
