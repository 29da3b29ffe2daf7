"""Switching a model built with torch.nn's recurrent layers to rnnfused's, and back, in place.

``rnnfused.convert(model)`` finds every ``torch.nn.LSTM``, ``GRU``, ``RNN``, ``LSTMCell``,
``GRUCell`` and ``RNNCell`` inside ``model`` (``model`` itself included) and turns it into the
rnnfused class of the same name by changing the object's class: it stays the same object, holding
the same Parameter objects (an optimizer built before the call keeps working, tied weights stay
tied), buffers, device, dtype, train/eval mode, hooks (forward hooks, ``state_dict`` hooks, the
pre-hooks of ``torch.nn.utils.weight_norm``) and ``torch.nn.utils.parametrize`` parametrizations
(``torch.nn.utils.parametrizations.weight_norm``, a DropConnect written as a parametrization).
That is possible because rnnfused's classes keep torch.nn's attributes exactly and differ only in
their ``forward``. ``convert(model, to="torch.nn")`` is the way back.

Only modules whose class is exactly one of those six (or its parametrized form) are converted: a
subclass of ``torch.nn.LSTM`` written by a user may override ``forward`` or depend on torch.nn's
internals, so it is left as it is, with a warning that names it. A module using one of rnnfused's
regularization options (recurrent_dropout, dropconnect, zoneout, cell_zoneout), which torch.nn's
classes do not have, is refused by ``to="torch.nn"`` before anything changes: its behaviour would
change silently.
"""
import warnings

import torch.nn as nn
from torch.nn.utils import parametrize

from . import modules

__all__ = ["convert"]

_PAIRS = (
    (nn.LSTM, modules.LSTM),
    (nn.GRU, modules.GRU),
    (nn.RNN, modules.RNN),
    (nn.LSTMCell, modules.LSTMCell),
    (nn.GRUCell, modules.GRUCell),
    (nn.RNNCell, modules.RNNCell),
)
_TARGETS = {"rnnfused": dict(_PAIRS), "torch.nn": {ours: theirs for theirs, ours in _PAIRS}}


def _built_class(module):
    """(the class the module was built as, its parametrized subclass or None):
    torch.nn.utils.parametrize swaps a parametrized module's class for a generated subclass
    ``Parametrized<Name>`` whose properties compute the parametrized tensors, and torch.jit.script
    switches an rnnfused module to its TorchScript form (rnnfused/_script.py), which counts as the
    rnnfused class it derives from."""
    from ._script import SCRIPT_CLASSES

    cls = type(module)
    if parametrize.is_parametrized(module) and len(cls.__bases__) == 1:
        base = cls.__bases__[0]
        if cls.__name__ == "Parametrized" + base.__name__:
            return base, cls
    scripted = {script: eager for eager, script in SCRIPT_CLASSES.items()}
    return scripted.get(cls, cls), None


def _retarget(module, target):
    _, parametrized = _built_class(module)
    if parametrized is None:
        module.__class__ = target
        return
    # The same generated subclass, over the other base: its properties (one per parametrized
    # tensor) and its copy/pickle guards carry over unchanged.
    namespace = {key: value for key, value in parametrized.__dict__.items() if key not in ("__dict__", "__weakref__")}
    module.__class__ = type("Parametrized" + target.__name__, (target,), namespace)


def convert(model: nn.Module, to: str = "rnnfused") -> nn.Module:
    """Turns every torch.nn recurrent layer and cell inside ``model`` (``model`` included) into
    rnnfused's (``to="rnnfused"``, the default), or every rnnfused one into torch.nn's
    (``to="torch.nn"``), in place, and returns ``model``: ``model = rnnfused.convert(model)``."""
    if to not in _TARGETS:
        raise ValueError(f"convert: `to` must be 'rnnfused' or 'torch.nn', got {to!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: expected a torch.nn.Module, got {type(model).__name__}")
    targets = _TARGETS[to]
    done = set(targets.values())
    if to == "torch.nn":
        for name, module in model.named_modules():
            options = [option for option in modules._RECURRENT_OPTIONS if getattr(module, option, 0)]
            if _built_class(module)[0] in targets and options:
                raise ValueError(
                    f"convert: {name or 'the model'} uses {', '.join(options)}, which torch.nn's "
                    f"{targets[_built_class(module)[0]].__name__} does not have; set them to 0 first "
                    "(nothing was converted)"
                )
    for name, module in model.named_modules():
        built, _ = _built_class(module)
        if built in targets:
            _retarget(module, targets[built])
        elif built not in done and isinstance(module, tuple(targets)):
            base = next(cls for cls in targets if isinstance(module, cls))
            warnings.warn(
                f"rnnfused.convert: left {name or 'the model'} ({built.__qualname__}, a subclass of "
                f"{base.__module__}.{base.__qualname__}) as it is: a subclass may override forward or rely on "
                "its base class's internals; convert its base class's instances only",
                stacklevel=2,
            )
    return model
