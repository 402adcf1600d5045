"""VGG19 (configuration "E") layer table, free of jax so that data_prep tools can import it.

torchvision builds `features` as a flat nn.Sequential: each conv is followed by a ReLU and each
"M" is a 2x2 max-pool, so conv i sits at Sequential index i. Those indices name our parameters
(`vgg/features_<i>`) so a torchvision state_dict (`features.<i>.weight`) maps onto them by name.
"""

# Output channels per conv, "M" = max-pool.
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
             512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


def scaled(channels: int, width: float) -> int:
  """Channel count of a width-scaled model: max(1, int(c * width)) (width 1.0 = the reference)."""
  return max(1, int(channels * width))


def vgg19_conv_layers(width: float = 1.0, in_channels: int = 3) -> list[tuple[int, int, int]]:
  """[(torch Sequential index, in_channels, out_channels)] for the 16 convs of VGG19.

  Indices are 0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34 (conv + ReLU take two
  slots, a pool one).
  """
  layers = []
  index, cin = 0, in_channels
  for v in VGG19_CFG:
    if v == "M":
      index += 1
    else:
      cout = scaled(v, width)
      layers.append((index, cin, cout))
      cin = cout
      index += 2
  return layers
