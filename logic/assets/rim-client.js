<!-- placeholder: written by the demo work -->
