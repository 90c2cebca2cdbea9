"""A plugin named 'fixture-twin', as is the one in ikkuna-twin-a."""

import ikkuna_core as ik


@ik.hookimpl
def ikkuna_topics() -> list[ik.TopicSpec]:
    return [ik.TopicSpec(name="twin_b", kind="network", doc="from ikkuna-twin-b")]
