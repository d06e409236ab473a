#include "common/result.h"

namespace gpup {

std::string Error::describe() const {
  std::string s = gpup_status_name(status);
  s += ": ";
  s += message.empty() ? gpup_status_message(status) : message;
  return s;
}

}  // namespace gpup
