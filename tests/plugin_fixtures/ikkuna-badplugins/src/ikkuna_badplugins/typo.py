"""A plugin with a misspelled hook name."""

import ikkuna_core as ik


@ik.hookimpl
def ikkuna_subscriber() -> list[type[ik.Subscriber]]:
    return []
