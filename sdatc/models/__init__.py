"""Model components: guidance encoder, zero convs and the other trainable parts around the frozen SD 2.1 UNet."""
