"""The test app wrapped in the stdlib's PEP 3333 validator: any server-side violation raises."""
from wsgiref.validate import validator

import app as _app

app = validator(_app.app)
