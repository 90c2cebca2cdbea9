"""A plugin whose subscriber claims a name that ikkuna-testplugin already uses."""

import ikkuna_core as ik


class OtherMean(ik.Subscriber):
    name = "scaled_mean"

    def compute(self, bundle: ik.MessageBundle) -> None:
        pass


@ik.hookimpl
def ikkuna_subscribers() -> list[type[ik.Subscriber]]:
    return [OtherMean]
