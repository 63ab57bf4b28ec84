"""torch.hub entry points: every dla_fast model, with random weights (nothing is downloaded).

    model = torch.hub.load("/path/to/dla_fast", "dla34", source="local")          # a local checkout
    model = torch.hub.load("/path/to/dla_fast", "centernet_dla34", source="local", heads={"hm": 20})
    dla_fast.load_checkpoint(model, "dla34.pth")   # then the weights: timm's, CenterNet's, your own

Keyword arguments go to dla_fast.create_model. `pretrained=True` is refused: dla_fast ships no weights and
never downloads them (see the README's "timm API" section for loading timm's weight files).
"""
dependencies = ["torch"]

import dla_fast as _dla_fast


def _entry(name):
    def build(pretrained: bool = False, **kwargs):
        if pretrained:
            raise ValueError(f"{name}: pretrained=True is not supported (dla_fast downloads nothing); build it with "
                             "random weights and load a weight file with dla_fast.load_checkpoint(model, path)")
        return _dla_fast.create_model(name, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"dla_fast.create_model({name!r}, **kwargs), random weights."
    return build


for _name in _dla_fast.list_models():
    globals()[_name] = _entry(_name)
