"""Exporting optimized modules: ONNX (:func:`export_onnx`).

Example::

    >>> import snnopt
    >>> opt = snnopt.optimize(model, (x,))
    >>> snnopt.export_onnx(opt, (x,), "model.onnx")     # needs `pip install 'snnopt[onnx]'`
"""

from snnopt.export.onnx_graph import MODES, ExportError, export_onnx

__all__ = ["export_onnx", "ExportError", "MODES"]
