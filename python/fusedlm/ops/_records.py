"""One named record per op (DESIGN.md, "One op, end to end").

An op's inputs are one ``NamedTuple`` (``AttentionInputs``, ``LoraInputs``, ...): the public
wrapper checks its arguments and builds the record; the custom op's body, its fake, its
``setup_context``, its backward and every backend take the record, never a re-spelled list.

A ``torch.library`` custom op takes tensors and scalars, not objects, so its schema is the
record's fields, in order and with the types of their annotations, then ``backend: str``.
:class:`RecordOp` is the one place that translates: it unpacks the records into the schema's
arguments when the op is called and builds them back from the arguments for the body, the fake
and ``setup_context``. An op may take several records (a backward op: the forward's record, then
one of its own).
"""
from __future__ import annotations

import inspect
import typing
from typing import Callable

import torch


class RecordOp:
    """A ``torch.library`` custom op whose arguments are the fields of `records`, then the backend name.

    ``op(*records, backend)`` runs it; ``op.custom_op`` is the ``torch.library`` op itself (for
    ``torch.library.opcheck``, which calls it with the flat schema arguments).
    """

    def __init__(self, name: str, records: tuple[type, ...], fn: Callable):
        self.records = records
        self.fields = [field for record in records for field in record._fields]
        returns = typing.get_type_hints(fn)["return"]
        self.custom_op = torch.library.custom_op(name, self._taking_records(fn), mutates_args=(),
                                                 schema=_schema(records, returns))

    def __call__(self, *records_and_backend):
        *records, backend = records_and_backend
        return self.custom_op(*(value for record in records for value in record), backend)

    def split(self, args) -> tuple:
        """The schema's arguments as ``(record, ..., backend)``."""
        out, start = [], 0
        for record in self.records:
            out.append(record(*args[start: start + len(record._fields)]))
            start += len(record._fields)
        return (*out, args[start])

    def _taking_records(self, fn: Callable) -> Callable:
        return lambda *args: fn(*self.split(args))

    def register_fake(self, fn: Callable) -> Callable:
        """``fn(*records, backend)`` returns empty outputs of the right shapes (decorator)."""
        self.custom_op.register_fake(self._taking_records(fn))
        return fn

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """``setup_context(ctx, *records, backend, output)``; ``backward(ctx, *grads)`` returns
        :meth:`grads`."""
        self.custom_op.register_autograd(
            backward, setup_context=lambda ctx, inputs, output: setup_context(ctx, *self.split(inputs), output))

    def grads(self, **by_field) -> tuple:
        """The backward's return value: the given gradients by field name, None for every other argument."""
        unknown = set(by_field) - set(self.fields)
        if unknown:
            raise TypeError(f"no such input: {sorted(unknown)}")
        return (*(by_field.get(field) for field in self.fields), None)  # None: backend

    def needs_grad(self, ctx, field: str) -> bool:
        """Whether autograd wants the gradient of input `field`."""
        return ctx.needs_input_grad[self.fields.index(field)]


def record_op(name: str, *records: type) -> Callable[[Callable], RecordOp]:
    """Decorator: ``fn(*records, backend) -> outputs`` becomes the custom op `name` (a RecordOp)."""
    return lambda fn: RecordOp(name, records, fn)


def _schema(records: tuple[type, ...], returns) -> str:
    """``(Tensor q, ..., str backend) -> (...)``: torch.library's schema of the records' fields."""
    def prototype(*args):  # only its signature is read
        raise NotImplementedError

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter(field, kind, annotation=annotation)
              for record in records for field, annotation in typing.get_type_hints(record).items()]
    params.append(inspect.Parameter("backend", kind, annotation=str))
    prototype.__signature__ = inspect.Signature(params, return_annotation=returns)
    return torch.library.infer_schema(prototype, mutates_args=())


def save_for_backward(ctx, record, *extra: torch.Tensor) -> None:
    """Saves `record` (and `extra` tensors) for the backward: tensor fields (None included) through
    ``ctx.save_for_backward``, the other fields as they are. :func:`saved` gives them back."""
    is_tensor = [value is None or isinstance(value, torch.Tensor) for value in record]
    ctx.save_for_backward(*(value for value, t in zip(record, is_tensor) if t), *extra)
    ctx.saved_record = (type(record), [None if t else value for value, t in zip(record, is_tensor)], is_tensor)


def saved(ctx) -> tuple:
    """``(record, *extra)`` as :func:`save_for_backward` saved them."""
    record_type, values, is_tensor = ctx.saved_record
    tensors = iter(ctx.saved_tensors)
    record = record_type(*(next(tensors) if t else value for value, t in zip(values, is_tensor)))
    return (record, *tensors)
