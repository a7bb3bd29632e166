"""python -m vsonnx: the same as the vsonnx command."""
from .cli import main

main()
