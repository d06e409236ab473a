#include "gpup/status.h"

extern "C" const char* gpup_status_name(gpup_status s) {
  switch (s) {
#define GPUP_STATUS_NAME_(name, value, text) \
  case value:                                \
    return #name;
    GPUP_STATUS_LIST(GPUP_STATUS_NAME_)
#undef GPUP_STATUS_NAME_
  }
  return "UNKNOWN_STATUS";
}

extern "C" const char* gpup_status_message(gpup_status s) {
  switch (s) {
#define GPUP_STATUS_TEXT_(name, value, text) \
  case value:                                \
    return text;
    GPUP_STATUS_LIST(GPUP_STATUS_TEXT_)
#undef GPUP_STATUS_TEXT_
  }
  return "unknown status";
}
