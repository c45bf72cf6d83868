"""The local web UI (``vlpretrain serve``): caption, ask, tokenise and generate with a trained LaVIT checkpoint.

One concept per module; only :mod:`~vlpretrain.web.layout` and :mod:`~vlpretrain.web.server` import gradio, so the
handlers stay plain functions (testable without a browser or gradio) and ``import vlpretrain`` stays light:

- :mod:`~vlpretrain.web.session`     the checkpoint folders and the models, loaded once for every request;
- :mod:`~vlpretrain.web.uploads`     uploaded files -> checked RGB images; shapes-world example images;
- :mod:`~vlpretrain.web.understand`  the Caption and Ask tabs;
- :mod:`~vlpretrain.web.tokens`      the Tokens tab (keep-mask overlay, token count, token ids);
- :mod:`~vlpretrain.web.generate`    the Generate tab (text or image + text -> visual tokens -> pixels, with progress);
- :mod:`~vlpretrain.web.layout`      the gradio page: components, tabs and their wiring to the handlers;
- :mod:`~vlpretrain.web.server`      launch: loopback by default, analytics and outbound calls off, one request at a
                                     time.
"""
