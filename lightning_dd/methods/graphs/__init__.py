"""Graph condensation: GCond, SGDD and node coresets on Planetoid-style graphs. Methods read a
:class:`lightning_dd.data.protocols.GraphData` DataModule and return a condensed graph."""
