"""The namespace lab: throwaway network namespaces with real tunnels, traffic
probes, capture on the far side, and the demo built on them."""
