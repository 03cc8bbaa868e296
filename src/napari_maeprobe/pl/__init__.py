"""pl: showing the observation table. The one colour policy (``colors``), the report with its
figures (``report``) and, without Qt, how the explorer maps rows to pixels and back
(``linking``)."""
