"""SSR model: GradCAM, affinity propagation, SGC, CMPA, decoder, losses and the composed model."""
