"""A plugin named 'fixture-twin', as is the one in ikkuna-twin-b."""

import ikkuna_core as ik


@ik.hookimpl
def ikkuna_topics() -> list[ik.TopicSpec]:
    return [ik.TopicSpec(name="twin_a", kind="network", doc="from ikkuna-twin-a")]
