"""The package's public face: light import, the JSON Schema contract, frozen messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pydantic
import pytest
import torch

import ikkuna_core as ik


def test_import_stays_light():
    code = (
        "import sys, ikkuna_core, ikkuna_core.plugins, ikkuna_core.testing;"
        "heavy = [m for m in ('matplotlib', 'tensorboard', 'torchvision', 'sklearn',"
        " 'torch._dynamo')"
        " if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_json_schema_describes_every_message_type():
    schema = ik.message_json_schema()
    json.dumps(schema)  # serialisable
    kinds = set(schema["message"]["discriminator"]["mapping"])
    assert kinds == {"module", "network", "scalars", "histograms"}
    module = schema["message"]["$defs"]["ModuleMessage"]
    assert {"topic", "global_step", "epoch", "batch_index", "module", "data"} <= set(
        module["properties"]
    )
    assert module["properties"]["data"]["type"] == "array"
    assert "messages" in schema["bundle"]["properties"]
    step = schema["step"]
    assert "payloads" in step["properties"]
    payloads = step["$defs"]["TopicPayloads"]["properties"]
    assert {"topic", "keys", "modules", "data"} <= set(payloads)
    scalars = schema["message"]["$defs"]["ScalarsMessage"]["properties"]
    assert {"keys", "tags", "data"} <= set(scalars)


def test_messages_are_frozen_and_validated():
    info = ik.ModuleInfo(name="fc", type="Linear")
    msg = ik.ModuleMessage(topic="weights", global_step=0, epoch=0, batch_index=0, module=info,
                           data=torch.zeros(2))
    with pytest.raises(pydantic.ValidationError):
        msg.topic = "biases"
    with pytest.raises(pydantic.ValidationError, match="Tensor"):
        ik.ModuleMessage(topic="weights", global_step=0, epoch=0, batch_index=0, module=info,
                         data=[1.0, 2.0])
    with pytest.raises(pydantic.ValidationError, match="greater than or equal"):
        ik.NetworkMessage(topic="loss", global_step=-1, epoch=0, batch_index=0)
    assert ik.ModuleMessage(topic="weights", global_step=0, epoch=0, batch_index=0, module=info,
                            parameter="weight_ih_l0", data=torch.zeros(1)).key == "fc.weight_ih_l0"
    assert msg.key == "fc"
