"""Controls of GB/T 39725-2020 Appendix F that live outside the exchange itself.

- :mod:`.operators`: who runs the bridge, their roles and what each role may do;
- :mod:`.agreements`: the data-use agreement a link carries, and when it holds;
- :mod:`.catalog`: the Appendix F items a bridge can evidence, with the standard's text;
- :mod:`.report`: ``bridge compliance report`` (each item's status for a configuration,
  the feature behind it and the tests that prove it).

Nothing here does I/O except :mod:`.report`, which reads files it is given.
"""
