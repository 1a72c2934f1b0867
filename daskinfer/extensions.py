"""Column types of daskinfer's blocks, for code that builds or inspects them (as
``ray.data.extensions``).

``TensorArray`` is the pandas extension array that holds an N-D column (embeddings,
images) as one ``(rows, *cell_shape)`` array; ``TensorDtype`` is its dtype, named like
``tensor[float32,(384)]``. ``TensorArray(array)`` wraps an array without copying it, and
``series.array.values`` gives the array back.
"""

from __future__ import annotations

from daskinfer._internal.tensor import TensorArray, TensorDtype

__all__ = ["TensorArray", "TensorDtype"]
