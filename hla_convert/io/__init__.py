"""What a conversion reads and writes: MODEL path checks, the output-folder guard, the adapter
file, the output folder, the Hub, sample media and the `sample` engine. Imports the stages and
everything below them, never hla_convert.conversion or hla_convert.cli (docs/architecture.md)."""
